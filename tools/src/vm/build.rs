//! Statically linked builds of workspace binaries, for copying into guests.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::host::{is_static_elf, run_command};
use super::VmError;

/// Target triple of static builds (given explicitly so proc-macros still build for the host).
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the `rnvme` binary statically linked (release, `RUSTFLAGS=-C target-feature=+crt-static`,
/// target dir `WORKSPACE/target/static` so the normal build is not invalidated) and returns its
/// path.
pub fn build_static_rnvme(workspace_root: &Path) -> Result<PathBuf, VmError> {
    build(workspace_root, Some("rnvme-tools"), "rnvme")
}

/// Builds the workspace binary `name` statically linked, like [`build_static_rnvme`], and returns
/// its path.
pub fn static_binary(workspace_root: &Path, name: &str) -> Result<PathBuf, VmError> {
    build(workspace_root, None, name)
}

/// The cargo arguments of a static build.
pub(crate) fn cargo_args(package: Option<&str>, bin: &str, target_dir: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["build", "--release", "--target", TARGET, "--bin", bin]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some(p) = package {
        a.push("-p".into());
        a.push(p.into());
    }
    a.push("--target-dir".into());
    a.push(target_dir.to_string_lossy().into_owned());
    a
}

/// `RUSTFLAGS` for a static build, keeping flags the caller already set.
pub(crate) fn static_rustflags(existing: Option<&str>) -> String {
    match existing.map(str::trim).filter(|s| !s.is_empty()) {
        Some(e) => format!("{e} -C target-feature=+crt-static"),
        None => "-C target-feature=+crt-static".to_string(),
    }
}

fn build(root: &Path, package: Option<&str>, bin: &str) -> Result<PathBuf, VmError> {
    let target_dir = root.join("target/static");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let existing = std::env::var("RUSTFLAGS").ok();
    log::info!("building static {bin} in {}", target_dir.display());
    run_command(
        Command::new(cargo)
            .args(cargo_args(package, bin, &target_dir))
            .current_dir(root)
            .env("RUSTFLAGS", static_rustflags(existing.as_deref()))
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET"),
    )?;
    let path = target_dir.join(TARGET).join("release").join(bin);
    if !is_static_elf(&path) {
        return Err(VmError::Command {
            command: format!("cargo build --bin {bin}"),
            detail: format!("{} is not a statically linked executable", path.display()),
        });
    }
    Ok(path)
}

/// Builds the fio engine, `librnvme_fio.so` (release), against the source of the fio installed
/// here (`tools/fio-source` fetches and configures it first), and returns its path. The guest
/// runs the host's fio, so the engine built for it loads there too.
pub fn fio_engine(workspace_root: &Path) -> Result<PathBuf, VmError> {
    run_command(Command::new(workspace_root.join("tools/fio-source")).current_dir(workspace_root))?;
    let target_dir = workspace_root.join("target/fio");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    log::info!("building the fio engine in {}", target_dir.display());
    run_command(
        Command::new(cargo)
            .args(["build", "--release", "-p", "rnvme-fio", "--target-dir"])
            .arg(&target_dir)
            .current_dir(workspace_root)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET"),
    )?;
    Ok(target_dir.join("release/librnvme_fio.so"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_build_arguments() {
        assert_eq!(
            cargo_args(Some("rnvme-tools"), "rnvme", Path::new("/w/target/static")),
            [
                "build",
                "--release",
                "--target",
                "x86_64-unknown-linux-gnu",
                "--bin",
                "rnvme",
                "-p",
                "rnvme-tools",
                "--target-dir",
                "/w/target/static"
            ]
        );
        assert!(!cargo_args(None, "x", Path::new("/t")).contains(&"-p".to_string()));
    }

    #[test]
    fn rustflags_are_extended() {
        assert_eq!(static_rustflags(None), "-C target-feature=+crt-static");
        assert_eq!(static_rustflags(Some(" ")), "-C target-feature=+crt-static");
        assert_eq!(
            static_rustflags(Some("-C debuginfo=0")),
            "-C debuginfo=0 -C target-feature=+crt-static"
        );
    }
}
