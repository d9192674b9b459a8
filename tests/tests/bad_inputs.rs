//! Bad inputs and set-up mistakes, in one guest: each gives one clear line and the documented
//! exit status (2 for bad usage, 1 for device and set-up problems), nothing is written when the
//! input is refused, and the device keeps working afterwards.

use rnvme_tests::{run_guest, Steps};
use rnvme_tools::vm::{ControllerSpec, NamespaceSpec, VmConfig};

const BDF: &str = "0000:00:04.0";
const LBA: u64 = 4096;
const SIZE_MIB: u64 = 64;
const LBAS: u64 = (SIZE_MIB << 20) / LBA;
/// The max transfer of QEMU's controller: MDTS 7 (its default), 2^7 pages of 4 KiB.
const MDTS: u64 = 512 << 10;
/// A write of six max transfers, and where its copies go.
const BIG: u64 = 6 * MDTS;
const FILE_AT: u64 = 1024;
const PIPE_AT: u64 = 2048;
const ODD_AT: u64 = 4096;
/// Never written: a verify there finds zeros.
const VERIFY_AT: u64 = 8192;

/// Shell helpers of this script (after the common prelude).
const HELPERS: &str = r#"
wr_stdin() { _wf=$1; shift; rnvme "$@" <"$_wf"; }
wr_pipe() { _pf=$1; shift; cat "$_pf" | rnvme "$@"; }
# closed_out CMD...: CMD with its stdout a pipe whose reader has exited; CMD's status
closed_out() {
    { sleep 0.5; "$@"; echo $? >/tmp/d/closed.rc; } | true
    return "$(cat /tmp/d/closed.rc)"
}
driver_of() { _dl=$(readlink "/sys/bus/pci/devices/$1/driver") && echo "${_dl##*/}"; }
# wait_open PID: wait (at most 30 s) until process PID has a VFIO group open
wait_open() {
    _oi=0
    while [ $_oi -lt 600 ]; do
        ls -l "/proc/$1/fd" 2>/dev/null | grep -q ' /dev/vfio/[0-9]' && return 0
        sleep 0.05
        _oi=$((_oi + 1))
    done
    echo "process $1 did not open a VFIO group within 30 s"
    return 1
}
unload_vfio() {
    for _m in vfio_pci vfio_pci_core vfio_virqfd irqbypass vfio_iommu_type1 vfio; do
        rmmod "$_m" || return 1
    done
    [ ! -e /dev/vfio/vfio ]
}
reload_vfio() { grep '^insmod' /init | sh && [ -e /dev/vfio/vfio ]; }
# fake_sysfs ROOT: a sysfs tree where the controller shares IOMMU group 7 with a NIC bound to
# e1000e (real vendor, device and class of the controller)
fake_sysfs() {
    _d=$1/bus/pci/devices
    mkdir -p "$_d/$NVME0" "$_d/0000:00:04.1" "$1/bus/pci/drivers/vfio-pci" \
        "$1/bus/pci/drivers/e1000e" "$1/kernel/iommu_groups/7/devices" &&
    for _f in vendor device class; do cp "/sys/bus/pci/devices/$NVME0/$_f" "$_d/$NVME0/"; done &&
    ln -s ../../../bus/pci/drivers/vfio-pci "$_d/$NVME0/driver" &&
    ln -s ../../../kernel/iommu_groups/7 "$_d/$NVME0/iommu_group" &&
    ln -s ../../../bus/pci/drivers/e1000e "$_d/0000:00:04.1/driver" &&
    ln -s ../../../kernel/iommu_groups/7 "$_d/0000:00:04.1/iommu_group" &&
    ln -s "../../../../bus/pci/devices/$NVME0" "$1/kernel/iommu_groups/7/devices/$NVME0" &&
    ln -s "../../../../bus/pci/devices/0000:00:04.1" "$1/kernel/iommu_groups/7/devices/0000:00:04.1"
}
"#;

fn script() -> String {
    let last = LBAS - 1;
    format!(
        r#"{HELPERS}
step kblk wait_blk $NVME0 1
B=$(blk $NVME0 1)
step list0 rnvme list --json

# Still bound to the kernel's nvme driver.
step not_bound rnvme identify $NVME0
step short_bdf rnvme identify 00:04.0
step upper_bdf rnvme identify 0000:00:0A.0
step garbage_bdf rnvme read nonsense --lba 0 --count 1
step no_device rnvme identify 0000:00:1e.0
step not_nvme rnvme identify 0000:00:1f.0
step unknown_command rnvme frobnicate
step missing_count rnvme read $NVME0 --lba 0
step kernel_alive0 kread "$B" 0 4096 /tmp/d/k0

# No VFIO modules at all.
step unload unload_vfio
step no_vfio_setup rnvme setup --hugepages 0 $NVME0
step no_vfio_driver driver_of $NVME0
step no_vfio_identify rnvme identify $NVME0
step kernel_alive1 kread "$B" 0 4096 /tmp/d/k1
step reload reload_vfio

# Bound to no driver.
step unbind sh -c "echo $NVME0 > /sys/bus/pci/devices/$NVME0/driver/unbind"
step no_driver rnvme identify $NVME0
step setup rnvme setup --hugepages 0 $NVME0
step list1 rnvme list --json
step alive0 rnvme read $NVME0 --lba 0 --count 1 --out /tmp/d/a0

# The VFIO container node is missing.
step hide mv /dev/vfio/vfio /dev/vfio-hidden
step no_container rnvme identify $NVME0
step unhide mv /dev/vfio-hidden /dev/vfio/vfio
step alive1 rnvme read $NVME0 --lba 0 --count 1 --out /tmp/d/a1

# The IOMMU group is shared with a device bound to another driver.
step fake fake_sysfs /tmp/fakesys
step not_viable env RNVME_SYSFS_ROOT=/tmp/fakesys rnvme identify $NVME0
step alive2 rnvme read $NVME0 --lba 0 --count 1 --out /tmp/d/a2

# Another process holds the controller (blocked writing to a FIFO nobody reads yet).
mkfifo /tmp/d/fifo
rnvme read $NVME0 --lba 0 --count 2 --out /tmp/d/fifo 2>/tmp/d/holder.err &
HOLDER=$!
step holder_open wait_open $HOLDER
step busy rnvme identify $NVME0
step drain sh -c 'cat /tmp/d/fifo >/tmp/d/fifo.out'
step holder_done wait $HOLDER
step holder_data wc -c /tmp/d/fifo.out
step alive3 rnvme read $NVME0 --lba 0 --count 1 --out /tmp/d/a3

# LBAs beyond the namespace: refused, nothing written.
step gen2 rnd /tmp/d/two {two}
step beyond_write rnvme write $NVME0 --lba {last} --in /tmp/d/two
step beyond_check rnvme read $NVME0 --lba {last} --count 1 --out /tmp/d/last
step beyond_zero is_zero /tmp/d/last {lba}
step beyond_read rnvme read $NVME0 --lba {lbas} --count 1 --out /tmp/d/x
step overflow_read rnvme read $NVME0 --lba 18446744073709551615 --count 2 --out /tmp/d/x
step zero_count rnvme read $NVME0 --lba 0 --count 0 --out /tmp/d/x
step beyond_zeroes rnvme write-zeroes $NVME0 --lba {last} --count 2
step huge_block_count rnvme write $NVME0 --lba 0 -c 36028797018963967 --in /tmp/d/two
step alive4 rnvme read $NVME0 --lba 0 --count 1 --out /tmp/d/a4

# Data that is not a multiple of the LBA size: refused, nothing written.
step gen_odd rnd /tmp/d/odd {odd}
step odd_write rnvme write $NVME0 --lba 100 --in /tmp/d/odd
step odd_stdin wr_stdin /tmp/d/odd write $NVME0 --lba 100
step empty_write wr_stdin /dev/null write $NVME0 --lba 100
step odd_check rnvme read $NVME0 --lba 100 --count 2 --out /tmp/d/odd.r
step odd_zero is_zero /tmp/d/odd.r {two}
step alive5 rnvme read $NVME0 --lba 0 --count 1 --out /tmp/d/a5

# A namespace that is not active: refused, nothing written anywhere.
step gen1 rnd /tmp/d/one {lba}
step ns2_read rnvme read $NVME0 --ns 2 --lba 0 --count 1 --out /tmp/d/x
step ns2_write rnvme write $NVME0 --ns 2 --lba 200 --in /tmp/d/one
step ns0_write rnvme write $NVME0 --ns 0 --lba 200 --in /tmp/d/one
step ns2_check rnvme read $NVME0 --lba 200 --count 1 --out /tmp/d/ns.r
step ns2_zero is_zero /tmp/d/ns.r {lba}
step alive6 rnvme read $NVME0 --lba 0 --count 1 --out /tmp/d/a6

# Writes longer than the max transfer (512 KiB) are streamed piece by piece, from a file and
# from a pipe; a pipe that ends in a partial LBA, or runs past the end of the namespace, stops
# there and says which LBAs were written.
step gen_big rnd /tmp/d/big {big}
step stream_file rnvme write $NVME0 --lba {file_at} --in /tmp/d/big
step stream_file_read rnvme read $NVME0 --lba {file_at} --count {big_lbas} --out /tmp/d/big.f
step stream_file_cmp same /tmp/d/big /tmp/d/big.f
step stream_pipe wr_pipe /tmp/d/big write $NVME0 --lba {pipe_at}
step stream_pipe_read rnvme read $NVME0 --lba {pipe_at} --count {big_lbas} --out /tmp/d/big.p
step stream_pipe_cmp same /tmp/d/big /tmp/d/big.p
step gen_big_odd sh -c 'cat /tmp/d/big /tmp/d/odd > /tmp/d/big.odd'
step stream_odd wr_pipe /tmp/d/big.odd write $NVME0 --lba {odd_at}
step stream_odd_read rnvme read $NVME0 --lba {odd_at} --count {big_lbas} --out /tmp/d/big.o
step stream_odd_cmp same /tmp/d/big /tmp/d/big.o
step stream_odd_after rnvme read $NVME0 --lba {odd_end} --count 2 --out /tmp/d/big.oa
step stream_odd_zero is_zero /tmp/d/big.oa {two}
step stream_beyond wr_pipe /tmp/d/big write $NVME0 --lba {beyond_at}
step stream_beyond_read rnvme read $NVME0 --lba {beyond_at} --count {mdts_lbas} --out /tmp/d/big.b
step gen_big_head sh -c 'head -c {mdts} /tmp/d/big > /tmp/d/big.h'
step stream_beyond_cmp same /tmp/d/big.h /tmp/d/big.b

# Trim and write-zeroes without a range: refused, the data stays.
step trim_no_range rnvme trim $NVME0
step zeroes_no_range rnvme write-zeroes $NVME0 --ns 1
step trim_all_and_range rnvme trim $NVME0 --all --lba 0 --count 1
step no_range_read rnvme read $NVME0 --lba {file_at} --count {big_lbas} --out /tmp/d/big.n
step no_range_cmp same /tmp/d/big /tmp/d/big.n

# A reader that went away: quiet success, or the status of what the command found.
step closed_read closed_out rnvme read $NVME0 --lba {file_at} --count {big_lbas}
step closed_identify closed_out rnvme identify $NVME0
step closed_verify closed_out rnvme verify $NVME0 --lba {verify_at} --count 64

# Controls: the same writes with valid input land where the checks above looked.
step control_odd rnvme write $NVME0 --lba 100 --in /tmp/d/two
step control_odd_read rnvme read $NVME0 --lba 100 --count 2 --out /tmp/d/c100
step control_odd_cmp same /tmp/d/two /tmp/d/c100
step control_last rnvme write $NVME0 --lba {last} --in /tmp/d/one
step control_ns rnvme write $NVME0 --ns 1 --lba 200 --in /tmp/d/one
step control_ns_read rnvme read $NVME0 --lba 200 --count 1 --out /tmp/d/c200
step control_ns_cmp same /tmp/d/one /tmp/d/c200

# Back to the kernel, which sees rnvme's last writes.
step reset rnvme reset $NVME0
step kblk2 wait_blk $NVME0 1
B=$(blk $NVME0 1)
step kread_last kread "$B" {last_off} {lba} /tmp/d/klast
step kcmp_last same /tmp/d/one /tmp/d/klast
step list2 rnvme list --json
"#,
        two = 2 * LBA,
        odd = LBA + 512,
        lba = LBA,
        lbas = LBAS,
        last_off = last * LBA,
        big = BIG,
        big_lbas = BIG / LBA,
        file_at = FILE_AT,
        pipe_at = PIPE_AT,
        odd_at = ODD_AT,
        odd_end = ODD_AT + BIG / LBA,
        beyond_at = LBAS - MDTS / LBA,
        mdts = MDTS,
        mdts_lbas = MDTS / LBA,
        verify_at = VERIFY_AT,
    )
}

fn list_entry(steps: &Steps, name: &str) -> serde_json::Value {
    let v = steps.ok(name).json();
    v.as_array()
        .unwrap_or_else(|| panic!("`rnvme list --json` is not an array: {v}"))
        .iter()
        .find(|e| e["bdf"] == BDF)
        .unwrap_or_else(|| panic!("{BDF} is not listed: {v}"))
        .clone()
}

#[test]
fn bad_inputs_give_clear_errors_and_leave_the_device_working() {
    let config = VmConfig {
        controllers: vec![ControllerSpec {
            namespaces: vec![NamespaceSpec {
                lba_size: LBA as u32,
                size_mib: SIZE_MIB,
                ..NamespaceSpec::default()
            }],
            ..ControllerSpec::default()
        }],
        ..VmConfig::default()
    };
    let run = run_guest(config, &[], &script());
    let s = &run.steps;

    assert!(s.ok("kblk").text().starts_with("/dev/nvme"));
    let e = list_entry(s, "list0");
    assert_eq!(e["driver"], "nvme", "{e}");
    assert_eq!(e["usable"], false, "{e}");
    assert!(
        e["reason"].as_str().unwrap_or("").contains("rnvme setup"),
        "{e}"
    );

    // Bound to nvme.
    s.failed("not_bound", 1).stderr_has(&[
        &format!("{BDF} is bound to nvme"),
        &format!("rnvme setup {BDF}"),
    ]);
    s.failed("short_bdf", 2)
        .stderr_has(&["not a PCI address", "did you mean 0000:00:04.0"]);
    s.failed("upper_bdf", 2)
        .stderr_has(&["did you mean 0000:00:0a.0"]);
    s.failed("garbage_bdf", 2)
        .stderr_has(&["`nonsense` is not a PCI address"]);
    s.failed("no_device", 1)
        .stderr_has(&["no PCI device 0000:00:1e.0", "rnvme list"]);
    s.failed("not_nvme", 1)
        .stderr_has(&["0000:00:1f.0 is not an NVMe controller"]);
    s.failed("unknown_command", 2);
    s.failed("missing_count", 2)
        .stderr_has(&["--lba and --count"]);
    s.ok("kernel_alive0");

    // No VFIO modules: setup says so, the kernel keeps the device.
    s.ok("unload");
    s.failed("no_vfio_setup", 1)
        .stderr_has(&["the vfio-pci driver is not available", "modprobe vfio-pci"]);
    assert_eq!(s.ok("no_vfio_driver").text(), "nvme");
    s.failed("no_vfio_identify", 1)
        .stderr_has(&[&format!("rnvme setup {BDF}")]);
    s.ok("kernel_alive1");
    s.ok("reload");

    // No driver at all.
    s.ok("unbind");
    s.failed("no_driver", 1).stderr_has(&[
        &format!("{BDF} is not bound to any driver"),
        &format!("rnvme setup {BDF}"),
    ]);
    let setup = s.ok("setup");
    assert!(
        setup
            .stdout
            .contains(&format!("{BDF}: no driver -> vfio-pci")),
        "{}",
        setup.describe()
    );
    let e = list_entry(s, "list1");
    assert_eq!(e["driver"], "vfio-pci", "{e}");
    assert_eq!(e["usable"], true, "{e}");
    s.ok("alive0");

    // No /dev/vfio/vfio.
    s.ok("hide");
    s.failed("no_container", 1).stderr_has(&[
        "vfio modules not loaded (no /dev/vfio/vfio)",
        "modprobe vfio-pci",
    ]);
    s.ok("unhide");
    s.ok("alive1");

    // Group not viable.
    s.ok("fake");
    s.failed("not_viable", 1).stderr_has(&[
        "IOMMU group 7 cannot be given to rnvme",
        "0000:00:04.1",
        "e1000e",
        "rnvme setup 0000:00:04.1",
    ]);
    s.ok("alive2");

    // Busy.
    s.ok("holder_open");
    s.failed("busy", 1)
        .stderr_has(&[&format!("{BDF} is already in use by another process")]);
    s.ok("drain");
    s.ok("holder_done");
    assert_eq!(
        s.ok("holder_data").text().split_whitespace().next(),
        Some((2 * LBA).to_string().as_str())
    );
    s.ok("alive3");

    // Beyond the namespace.
    let last = LBAS - 1;
    s.ok("gen2");
    s.failed("beyond_write", 2).stderr_has(&[
        &format!("LBAs {last}..{} are beyond namespace 1", last + 2),
        &format!("{LBAS} LBAs"),
    ]);
    s.ok("beyond_check");
    s.ok("beyond_zero");
    s.failed("beyond_read", 2)
        .stderr_has(&["beyond namespace 1"]);
    s.failed("overflow_read", 2)
        .stderr_has(&["beyond namespace 1"]);
    s.failed("zero_count", 2).stderr_has(&["--count"]);
    s.failed("beyond_zeroes", 2)
        .stderr_has(&["beyond namespace 1"]);
    // A count whose bytes would not fit in 64 bits: the range's error, nothing written.
    s.failed("huge_block_count", 2)
        .stderr_has(&["LBAs 0..36028797018963968 are beyond namespace 1"]);
    s.ok("alive4");

    // Not a multiple of the LBA size.
    s.ok("gen_odd");
    for name in ["odd_write", "odd_stdin"] {
        s.failed(name, 2).stderr_has(&[
            &format!("{} bytes", LBA + 512),
            &format!("{LBA}-byte LBA size"),
            "nothing was written",
        ]);
    }
    s.failed("empty_write", 2)
        .stderr_has(&["0 bytes", "nothing was written"]);
    s.ok("odd_check");
    s.ok("odd_zero");
    s.ok("alive5");

    // Inactive namespaces.
    s.ok("gen1");
    s.failed("ns2_read", 2)
        .stderr_has(&["namespace 2 is not active", "active namespaces: 1"]);
    s.failed("ns2_write", 2)
        .stderr_has(&["namespace 2 is not active"]);
    s.failed("ns0_write", 2);
    s.ok("ns2_check");
    s.ok("ns2_zero");
    s.ok("alive6");

    // Streamed writes.
    for name in [
        "gen_big",
        "stream_file",
        "stream_file_read",
        "stream_file_cmp",
        "stream_pipe",
        "stream_pipe_read",
        "stream_pipe_cmp",
        "gen_big_odd",
        "stream_odd_read",
        "stream_odd_cmp",
        "stream_odd_after",
        "stream_odd_zero",
        "stream_beyond_read",
        "gen_big_head",
        "stream_beyond_cmp",
    ] {
        s.ok(name);
    }
    let big_lbas = BIG / LBA;
    s.failed("stream_odd", 2).stderr_has(&[&format!(
        "the input is {} bytes, not a positive multiple of the namespace's {LBA}-byte LBA size; \
         its first {big_lbas} LBAs were written (LBAs {ODD_AT}..{}), the rest was not",
        BIG + LBA + 512,
        ODD_AT + big_lbas
    )]);
    let beyond_at = LBAS - MDTS / LBA;
    s.failed("stream_beyond", 2).stderr_has(&[&format!(
        "the input goes beyond namespace 1, which has {LBAS} LBAs (0..{LBAS}); \
         its first {} LBAs were written (LBAs {beyond_at}..{LBAS}), the rest was not",
        MDTS / LBA
    )]);

    // No range, no trim.
    for (name, cmd) in [
        ("trim_no_range", "trim"),
        ("zeroes_no_range", "write-zeroes"),
    ] {
        s.failed(name, 2).stderr_has(&[&format!(
            "{cmd} needs a range: add --lba L --count C, or --all for the whole namespace"
        )]);
    }
    s.failed("trim_all_and_range", 2)
        .stderr_has(&["give either --all or --lba and --count, not both"]);
    s.ok("no_range_read");
    s.ok("no_range_cmp");

    // Closed stdout.
    for name in ["closed_read", "closed_identify"] {
        let st = s.ok(name);
        assert_eq!(st.stderr, "", "{}", st.describe());
    }
    s.failed("closed_verify", 1).stderr_has(&["64 mismatching"]);

    // Controls and the way back to the kernel.
    for name in [
        "control_odd",
        "control_odd_read",
        "control_odd_cmp",
        "control_last",
        "control_ns",
        "control_ns_read",
        "control_ns_cmp",
        "reset",
        "kblk2",
        "kread_last",
        "kcmp_last",
    ] {
        s.ok(name);
    }
    let e = list_entry(s, "list2");
    assert_eq!(e["driver"], "nvme", "{e}");
}
