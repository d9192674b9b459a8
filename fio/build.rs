//! Compiles `c/engine.c`, fio's side of the engine, against the source of the fio that will
//! load it: `RNVME_FIO_SRC`, or `target/fio-src/fio` as `tools/fio-source` prepares it
//! (Debian's source package of the installed fio, configured). fio's structures change
//! between versions, so the engine is built for one fio and refuses to run in another.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=c/engine.c");
    println!("cargo:rerun-if-env-changed=RNVME_FIO_SRC");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let src = std::env::var_os("RNVME_FIO_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/fio-src/fio"));
    let config = src.join("config-host.h");
    println!("cargo:rerun-if-changed={}", config.display());
    if !config.is_file() {
        eprintln!(
            "error: the fio engine is built against the source of the fio that loads it, and \
             {} is missing: run tools/fio-source (apt-get source fio, then fio's ./configure), \
             or point RNVME_FIO_SRC at a configured fio source tree",
            config.display()
        );
        std::process::exit(1);
    }
    // fio's own version string, as its Makefile would define it (FIO-VERSION-GEN's default).
    let gen = std::fs::read_to_string(src.join("FIO-VERSION-GEN")).unwrap_or_default();
    let Some(version) = gen
        .lines()
        .find_map(|l| l.strip_prefix("DEF_VER="))
        .map(str::trim)
    else {
        eprintln!(
            "error: no DEF_VER in {}",
            src.join("FIO-VERSION-GEN").display()
        );
        std::process::exit(1);
    };
    println!("cargo:rustc-env=RNVME_FIO_VERSION={version}");
    cc::Build::new()
        .file("c/engine.c")
        .include(&src)
        .flag("-include")
        .flag(config.to_str().expect("a UTF-8 path"))
        .flag("-std=gnu99")
        .define("_GNU_SOURCE", None)
        .define("_LARGEFILE_SOURCE", None)
        .define("_FILE_OFFSET_BITS", "64")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(true)
        .compile("rnvme_fio_engine");
    // The engine's C side refers to fio's own symbols (log_err, io_u_queued, ...), resolved
    // from the fio executable that loads the library.
    println!("cargo:rustc-cdylib-link-arg=-Wl,--allow-shlib-undefined");
}
