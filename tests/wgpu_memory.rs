//! The wgpu runtime's pool accounting (`WgpuRuntime::memory`), in a test binary of its own so
//! no other test allocates at the same time (and its tests one at a time): buffers in use,
//! buffers held for reuse, and their peaks, in whole size classes.

mod common;

use tuna::Device;

/// The tests read the pool's totals, so they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn pool_memory_counts_live_and_held_bytes_and_their_peaks() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
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

/// Many small buffers freed at once (a decoding step's activations) are all kept and handed out
/// again: the next step makes no new buffers (and so meets its kept bind groups again). Large
/// classes keep at most 8.
#[test]
fn pool_keeps_small_buffers_freed_together_and_at_most_8_large_ones() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for dev in common::devices() {
        let Device::Wgpu(i) = dev else { continue };
        let rt = tuna::device::wgpu::runtime(i).unwrap();
        // A class no other test here uses: 1 KiB.
        let bufs: Vec<_> = (0..100).map(|_| rt.alloc(1000)).collect();
        drop(bufs);
        let held = rt.memory().held;
        let again: Vec<_> = (0..100).map(|_| rt.alloc(1000)).collect();
        assert_eq!(rt.memory().held, held, "100 freed 1 KiB buffers are all reused");
        drop(again);
        // 16 MiB buffers: 12 at once, 8 kept after.
        let class = 16u64 << 20;
        let big: Vec<_> = (0..12).map(|_| rt.alloc(class as usize)).collect();
        let with_big = rt.memory().held;
        drop(big);
        assert_eq!(rt.memory().held, with_big - 4 * class, "12 freed 16 MiB buffers leave 8 kept");
    }
}
