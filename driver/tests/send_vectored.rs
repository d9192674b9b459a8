//! `send_vectored`: headers and DMA memory go out in one writev, in order; partial writes
//! resume where they stopped.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use rnvme_driver::controller::Controller;
use rnvme_driver::dma::{send_vectored, SendPart};
use rnvme_driver::hw::Hardware;
use rnvme_driver::model::{model_options, Model, ModelConfig};

fn ctrl() -> Controller {
    let hw: Arc<dyn Hardware> = Model::new(ModelConfig::default());
    Controller::init(hw, model_options()).unwrap()
}

#[test]
fn headers_and_dma_memory_in_one_call() {
    let c = ctrl();
    let buf = c.alloc(8192).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    buf.write_bytes(0, &data);
    let (a, mut b) = UnixStream::pair().unwrap();
    let parts = [
        SendPart::Bytes(b"head"),
        SendPart::Dma(&buf, 100, 5000),
        SendPart::Bytes(&[]),
        SendPart::Bytes(b"tail"),
    ];
    let n = send_vectored(a.as_fd(), &parts).unwrap();
    assert_eq!(n, 4 + 5000 + 4);
    drop(a);
    let mut got = Vec::new();
    b.read_to_end(&mut got).unwrap();
    let mut want = b"head".to_vec();
    want.extend_from_slice(&data[100..5100]);
    want.extend_from_slice(b"tail");
    assert_eq!(got, want);
    assert_eq!(send_vectored(b.as_fd(), &[]).unwrap(), 0);
}

#[test]
#[should_panic(expected = "outside")]
fn ranges_outside_the_buffer_are_refused() {
    let c = ctrl();
    let buf = c.alloc(4096).unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    let _ = send_vectored(a.as_fd(), &[SendPart::Dma(&buf, 4000, 200)]);
}
