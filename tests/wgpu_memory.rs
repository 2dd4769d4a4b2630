//! The wgpu runtime's pool accounting (`WgpuRuntime::memory`), in a test binary of its own so
//! no other test allocates at the same time: buffers in use, buffers held for reuse, and
//! their peaks, in whole size classes.

mod common;

use tuna::Device;

#[test]
fn pool_memory_counts_live_and_held_bytes_and_their_peaks() {
    for dev in common::devices() {
        let Device::Wgpu(i) = dev else { continue };
        let rt = tuna::device::wgpu::runtime(i).unwrap();
        rt.reset_peak_memory();
        let before = rt.memory();
        // 3 MiB + 1 rounds up to the 4 MiB class; two of them at once.
        let class = 4u64 << 20;
        let a = rt.alloc((3 << 20) + 1);
        let b = rt.alloc(3 << 20);
        let during = rt.memory();
        assert_eq!(during.live, before.live + 2 * class, "{during:?}");
        assert!(during.held >= before.held + class && during.held >= during.live, "{during:?}");
        drop(a);
        drop(b);
        let after = rt.memory();
        assert_eq!(after.live, before.live, "dropped buffers are no longer live: {after:?}");
        assert_eq!(after.peak_live, before.live + 2 * class, "{after:?}");
        // Kept for reuse: still held, and handed out again without a new allocation.
        assert_eq!(after.held, during.held, "{after:?}");
        let c = rt.alloc(4 << 20);
        assert_eq!(rt.memory().held, after.held, "a freed 4 MiB buffer is reused");
        drop(c);
        rt.reset_peak_memory();
        assert_eq!(rt.memory().peak_live, rt.memory().live);
    }
}
