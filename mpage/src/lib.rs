#![forbid(unsafe_code)]
//! rnvme-mpage (in progress)
