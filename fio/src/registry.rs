//! The controllers of this process: one [`Controller`] per PCI address, opened by the first
//! job (or fio's setup) that names it and shared by every job thread after it; closed when
//! fio unloads the engine.

use std::sync::{Arc, Mutex};

use rnvme_driver::controller::{Controller, ControllerOptions};
use rnvme_driver::dma::Backing;

use crate::EngineError;

/// Each open controller: its address, whether its DMA memory is hugepages, the controller.
static CONTROLLERS: Mutex<Vec<(String, bool, Arc<Controller>)>> = Mutex::new(Vec::new());

/// The controller at `bdf`, opened now if this process has not opened it yet. `hugepages`
/// chooses where its DMA memory comes from: the first opener decides, and a later job that
/// asks otherwise is refused rather than silently given the other kind.
pub fn controller(bdf: &str, hugepages: bool) -> Result<Arc<Controller>, EngineError> {
    let mut all = CONTROLLERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, huge, c)) = all.iter().find(|(b, _, _)| b == bdf) {
        if *huge != hugepages {
            return Err(EngineError::msg(format!(
                "{bdf} is already open with rnvme_hugepages={} by an earlier job of this fio \
                 process: give every job on it the same rnvme_hugepages",
                u8::from(*huge)
            )));
        }
        return Ok(c.clone());
    }
    let options = ControllerOptions {
        backing: if hugepages {
            Backing::Hugepages
        } else {
            Backing::SmallPages
        },
        ..ControllerOptions::default()
    };
    // The driver's errors name the device.
    let c = Arc::new(Controller::open(bdf, options).map_err(|e| EngineError::msg(e.to_string()))?);
    all.push((bdf.to_string(), hugepages, c.clone()));
    Ok(c)
}

/// Closes the controllers no job holds any more (all of them once fio's jobs are done):
/// their queues are deleted and the controllers shut down.
pub fn close_all() {
    let all = std::mem::take(&mut *CONTROLLERS.lock().unwrap_or_else(|e| e.into_inner()));
    drop(all);
}
