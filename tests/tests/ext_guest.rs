//! ext2/ext3/ext4 images made on the host by Debian's e2fsprogs become the emulated
//! namespaces (`NamespaceSpec::image`); in the guest, after `rnvme setup`, `rnvme cat`,
//! `rnvme cp` and `rnvme ls -l` read them through the mpage page cache, and the host compares
//! the guest's SHA-256 of every file with the source file's.
//!
//! The images hold: a large contiguous file; a file fragmented by freeing every other small
//! file of a nearly full file system and then writing it (a depth-2 extent tree at 1 KiB
//! blocks); sparse files with holes at the start, middle and end; sizes that are not a
//! multiple of the block size; an ext2 file past 12 blocks (indirect) and one past the
//! double-indirect threshold at 1 KiB blocks; files with inline data; deep directories, an
//! htree directory and symbolic links. For each file the commands issued are printed against
//! its extent count. The images must come back unchanged: nothing is ever written.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rnvme_tests::run_guest;
use rnvme_tools::vm::{ControllerSpec, NamespaceSpec, VmConfig};

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let p = std::env::temp_dir().join(format!("rnvme-ext-guest-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Run a host tool; `ok` lists the exit codes that count as success.
fn run(cmd: &mut Command, ok: &[i32]) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (the test needs e2fsprogs and coreutils)")
    });
    let code = out.status.code().unwrap_or(-1);
    assert!(
        ok.contains(&code),
        "{cmd:?} exited with {code}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path), &[0]);
    out.split_whitespace().next().unwrap().to_string()
}

/// Deterministic bytes (a 64-bit LCG) for file `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

fn put(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

fn put_sparse(root: &Path, rel: &str, size: u64, data: &[(u64, usize)]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    let f = fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in data.iter().enumerate() {
        f.write_all_at(&pattern(500 + i as u64, len), off).unwrap();
    }
}

fn mkfs(img: &Path, kind: &str, bs: u32, opts: &[&str], src: &Path, size: &str) {
    run(
        Command::new("mke2fs")
            .args(["-F", "-q", "-t", kind, "-b", &bs.to_string()])
            .args(opts)
            .arg("-d")
            .arg(src)
            .arg(img)
            .arg(size),
        &[0],
    );
}

fn debugfs_w(img: &Path, cmds: &[String]) {
    let file = img.with_extension("debugfs");
    fs::write(&file, cmds.join("\n") + "\n").unwrap();
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&file)
        .arg(img)
        .output()
        .expect("run debugfs");
    let err = String::from_utf8_lossy(&out.stderr);
    let complaints = err
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .count();
    assert!(
        out.status.success() && complaints == 0,
        "debugfs {cmds:?}: {err}"
    );
}

/// One image, the namespace it becomes, and the files to read from it.
struct Image {
    name: &'static str,
    path: PathBuf,
    lba: u32,
    /// Guest path → host file with the expected content.
    files: Vec<(String, PathBuf)>,
    /// A file whose `--stats` must show per-block fallbacks (fragmented at 1 KiB blocks).
    fragmented: Option<String>,
}

fn image(dir: &Path, name: &'static str, lba: u32) -> Image {
    Image {
        name,
        path: dir.join(format!("{name}.img")),
        lba,
        files: Vec::new(),
        fragmented: None,
    }
}

impl Image {
    fn add(&mut self, src: &Path, rel: &str) {
        self.files.push((format!("/{rel}"), src.join(rel)));
    }
}

const DEEP: &str = "level_one/level_two/level_three/level_four/level_five/level_six";

fn build_images(dir: &Path) -> Vec<Image> {
    let mut images = Vec::new();

    // ext4, 4 KiB blocks, on 4 KiB LBAs: contiguous, odd sizes, sparse, deep, links, htree.
    let src = dir.join("src4");
    put(&src, "big", &pattern(1, 8 << 20));
    put(&src, "odd", &pattern(2, 123_457));
    put_sparse(
        &src,
        "sparse",
        5 << 20,
        &[(100 << 10, 50_000), (2 << 20, 9999)],
    );
    put(&src, &format!("{DEEP}/deepfile"), &pattern(3, 7777));
    std::os::unix::fs::symlink("odd", src.join("fast_link")).unwrap();
    let long = format!("/{DEEP}/deepfile");
    assert!(
        long.len() >= 60,
        "a slow symlink: its target does not fit in i_block"
    );
    std::os::unix::fs::symlink(&long, src.join("slow_link")).unwrap();
    std::os::unix::fs::symlink("level_one/level_two", src.join("dir_link")).unwrap();
    std::os::unix::fs::symlink("loop_b", src.join("loop_a")).unwrap();
    std::os::unix::fs::symlink("loop_a", src.join("loop_b")).unwrap();
    for i in 0..300 {
        put(&src, &format!("many/n{i:03}"), format!("{i}\n").as_bytes());
    }
    let mut a = image(dir, "ext4_4k", 4096);
    mkfs(&a.path, "ext4", 4096, &[], &src, "32M");
    run(
        Command::new("e2fsck").args(["-f", "-y", "-D"]).arg(&a.path),
        &[0, 1],
    );
    for f in ["big", "odd", "sparse", "many/n000", "many/n299"] {
        a.add(&src, f);
    }
    a.add(&src, &format!("{DEEP}/deepfile"));
    a.files.push(("/fast_link".into(), src.join("odd")));
    a.files
        .push(("/slow_link".into(), src.join(DEEP).join("deepfile")));
    a.files.push((
        "/dir_link/level_three/level_four/level_five/level_six/deepfile".into(),
        src.join(DEEP).join("deepfile"),
    ));
    images.push(a);

    // ext2, 1 KiB blocks: indirect, double indirect, and past it (triple, sparse).
    let src = dir.join("src2");
    put(&src, "ind", &pattern(4, 300 * 1024 + 1));
    let tind_at = (12 + 256 + 256 * 256 + 100) * 1024u64;
    put_sparse(
        &src,
        "huge_sparse",
        tind_at + (1 << 20) + 333,
        &[(3 * 1024, 10_000), (tind_at, 40_000)],
    );
    let mut b = image(dir, "ext2_1k", 512);
    mkfs(&b.path, "ext2", 1024, &[], &src, "16M");
    b.add(&src, "ind");
    b.add(&src, "huge_sparse");
    images.push(b);

    // ext4, 1 KiB blocks, fragmented: fill, free every other file, write the big one.
    let src = dir.join("srcf");
    let count = 2500;
    for i in 0..count {
        put(&src, &format!("fill/f{i}"), &pattern(1000 + i, 2048));
    }
    let mut c = image(dir, "ext4_1k_frag", 512);
    mkfs(
        &c.path,
        "ext4",
        1024,
        &["-N", "2700", "-O", "^has_journal"],
        &src,
        "8M",
    );
    let big = dir.join("frag_big");
    fs::write(&big, pattern(9, 800_000)).unwrap();
    let mut cmds: Vec<String> = (0..count)
        .step_by(2)
        .map(|i| format!("rm /fill/f{i}"))
        .collect();
    cmds.push(format!("write {} frag", big.display()));
    debugfs_w(&c.path, &cmds);
    c.files.push(("/frag".into(), big));
    c.add(&src, "fill/f1");
    c.fragmented = Some("/frag".into());
    images.push(c);

    // ext4 with inline data; ext3 with 2 KiB blocks.
    let src = dir.join("srci");
    put(&src, "tiny", &pattern(5, 50));
    put(&src, "spill", &pattern(6, 110));
    put(&src, "sub/notinline", &pattern(7, 20_000));
    let mut d = image(dir, "ext4_inline", 512);
    mkfs(
        &d.path,
        "ext4",
        4096,
        &["-O", "inline_data", "-I", "256"],
        &src,
        "8M",
    );
    for f in ["tiny", "spill", "sub/notinline"] {
        d.add(&src, f);
    }
    images.push(d);

    let src = dir.join("src3");
    put(&src, "odd", &pattern(8, 1_000_001));
    put_sparse(&src, "sparse", 3 << 20, &[(0, 4096), (1 << 20, 3000)]);
    let mut e = image(dir, "ext3_2k", 512);
    mkfs(&e.path, "ext3", 2048, &[], &src, "16M");
    e.add(&src, "odd");
    e.add(&src, "sparse");
    images.push(e);

    images
}

/// `N read commands (F per-block fallbacks)` from a `--stats` line.
fn stats_commands(stderr: &str) -> (u64, u64) {
    let num_before = |s: &str, tag: &str| -> u64 {
        let at = s.find(tag).unwrap_or_else(|| panic!("no {tag:?} in {s:?}"));
        s[..at]
            .trim_end()
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (
        num_before(stderr, " read commands"),
        num_before(stderr, " per-block fallbacks"),
    )
}

#[test]
fn ext_images_read_in_the_guest_match_their_sources() {
    let scratch = Scratch::new();
    let images = build_images(&scratch.0);
    let before: Vec<String> = images.iter().map(|i| sha256(&i.path)).collect();

    let controllers = images
        .iter()
        .map(|i| ControllerSpec {
            serial: i.name.replace('_', "-"),
            namespaces: vec![NamespaceSpec {
                size_mib: fs::metadata(&i.path).unwrap().len() >> 20,
                lba_size: i.lba,
                image: Some(i.path.clone()),
                ..NamespaceSpec::default()
            }],
            ..ControllerSpec::default()
        })
        .collect();
    let config = VmConfig {
        controllers,
        ..VmConfig::default()
    };

    let mut script = String::from(
        "sum_of() { { rnvme cat \"$@\"; echo $? >/tmp/d/cat.rc; } | sha256sum; return $(cat /tmp/d/cat.rc); }\n",
    );
    let bdfs: Vec<String> = (0..images.len()).map(|c| format!("$NVME{c}")).collect();
    script += &format!("step setup rnvme setup --hugepages 0 {}\n", bdfs.join(" "));
    for (c, img) in images.iter().enumerate() {
        script += &format!("step c{c}_ls rnvme ls $NVME{c} -l /\n");
        for (k, (guest, _)) in img.files.iter().enumerate() {
            script += &format!("step c{c}_f{k} sum_of $NVME{c} {guest} --stats\n");
        }
    }
    // cp, and the refusals.
    script += "step cp rnvme cp $NVME0 /odd /tmp/d --stats\n";
    script += "step cp_sum sha256sum /tmp/d/odd\n";
    script += "step ls_deep rnvme ls $NVME0 -l /level_one/level_two\n";
    script += "step loop rnvme cat $NVME0 /loop_a\n";
    script += "step dir rnvme cat $NVME0 /many\n";
    script += "step missing rnvme cat $NVME0 /many/nope\n";
    script += "step bad_ns rnvme cat $NVME1 /ind --ns 7\n";

    let run = run_guest(config, &[], &script);
    let steps = &run.steps;
    steps.ok("setup");

    for (c, img) in images.iter().enumerate() {
        let ls = steps.ok(&format!("c{c}_ls"));
        println!("{}:\n{}", img.name, ls.stdout);
        for (k, (guest, host)) in img.files.iter().enumerate() {
            let step = steps.ok(&format!("c{c}_f{k}"));
            let got = step.text().split_whitespace().next().unwrap_or("");
            assert_eq!(
                got,
                sha256(host),
                "{} {guest}: the guest read other bytes\n{}",
                img.name,
                step.describe()
            );
            let (cmds, fallback) = stats_commands(&step.stderr);
            println!("{} {guest}: {}", img.name, step.stderr.trim());
            // ls -l planned the same read (files at the root only).
            let name = guest.trim_start_matches('/');
            if let Some(row) = ls
                .stdout
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|w| w.len() == 6 && w[5] == name && w[0] == "file")
            {
                assert_eq!(
                    (
                        row[3].parse::<u64>().unwrap(),
                        row[4].parse::<u64>().unwrap()
                    ),
                    (cmds, fallback),
                    "{} {guest}: ls -l planned other commands than cat issued\n{}",
                    img.name,
                    ls.stdout
                );
                println!(
                    "{} {guest}: {} extents, {cmds} read commands ({fallback} per-block)",
                    img.name, row[2]
                );
            }
            if img.fragmented.as_deref() == Some(guest.as_str()) {
                assert!(
                    fallback > 0,
                    "{guest}: pages spanning fragments go block by block"
                );
            }
        }
    }

    // The contiguous 8 MiB file: one extent; 512 KiB commands (QEMU's default MDTS).
    let ls0 = &steps.get("c0_ls").stdout;
    let big: Vec<&str> = ls0
        .lines()
        .find(|l| l.ends_with(" big"))
        .expect("big is listed")
        .split_whitespace()
        .collect();
    assert_eq!(big[..3], ["file", "8388608", "1"], "{ls0}");
    let big_cmds: u64 = big[3].parse().unwrap();
    assert!((16..=17).contains(&big_cmds), "{ls0}");
    assert!(ls0.contains("fast_link -> odd"), "{ls0}");
    assert!(ls0.contains("dir_link -> level_one/level_two"), "{ls0}");
    let ls2 = &steps.get("c2_ls").stdout;
    let frag: Vec<&str> = ls2
        .lines()
        .find(|l| l.ends_with(" frag"))
        .expect("frag is listed")
        .split_whitespace()
        .collect();
    assert!(frag[2].parse::<u64>().unwrap() > 100, "fragmented: {ls2}");
    let ls3 = &steps.get("c3_ls").stdout;
    assert!(
        ls3.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == ["file", "50", "inline", "0", "0", "tiny"]),
        "{ls3}"
    );

    let cp = steps.ok("cp");
    assert!(
        cp.stdout.contains("/odd -> /tmp/d/odd: 123457 bytes"),
        "{}",
        cp.describe()
    );
    assert!(cp.stdout.contains("read commands"), "{}", cp.describe());
    let got = steps
        .ok("cp_sum")
        .text()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(got, sha256(&images[0].files[1].1), "cp copied other bytes");
    assert!(steps.ok("ls_deep").stdout.contains("level_three"));

    steps
        .failed("loop", 1)
        .clean_error()
        .stderr_has(&["/loop_a", "too many levels of symbolic links"]);
    steps
        .failed("dir", 2)
        .clean_error()
        .stderr_has(&["/many is a directory"]);
    steps
        .failed("missing", 1)
        .clean_error()
        .stderr_has(&["/many/nope: no such file or directory"]);
    steps.failed("bad_ns", 2).clean_error();

    // Nothing was written to any namespace.
    for (img, old) in images.iter().zip(&before) {
        assert_eq!(&sha256(&img.path), old, "{}: the image changed", img.name);
    }
}
