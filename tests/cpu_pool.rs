//! The CPU backend on a caller's rayon pool starts no threads of its own: a
//! projector built and run there (its first forward absorbs the
//! cross-attention weights on the host) uses the caller's threads only. Its
//! own test binary: threads and rayon's global pool are per process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use output_projector::config::{Modality, ProjectorConfig, Variant};
use output_projector::cpu::rayon::ThreadPoolBuilder;
use output_projector::cpu::Cpu;
use output_projector::ops::{Backend, KernelVersion};
use output_projector::projector::Projector;
use output_projector::tensor::HostTensor;
use output_projector::weights::ProjectorWeights;

/// The process's threads now.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

#[test]
fn a_forward_on_a_callers_pool_starts_no_threads() {
    let pool = Arc::new(ThreadPoolBuilder::new().num_threads(2).build().unwrap());
    let cpu = Cpu::on_pool(pool, KernelVersion::Fast);
    let config = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    let weights = ProjectorWeights::random(config.clone(), Some(Modality::Image), 0).unwrap();
    let projector = Projector::new(cpu.clone(), &weights).unwrap();
    let hidden = HostTensor::randn(vec![1, 4, config.in_dim], 1, "hidden").unwrap();
    let hidden = cpu.upload(&hidden).unwrap();

    // A thread counts the process's threads every millisecond while the
    // first forward runs (the absorption alone takes tens of milliseconds).
    let before = threads();
    let done = AtomicBool::new(false);
    let most = std::thread::scope(|s| {
        let watch = s.spawn(|| {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(threads());
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            most
        });
        let y = projector
            .forward(&hidden, None)
            .and_then(|y| cpu.download(&y));
        done.store(true, Ordering::Relaxed);
        let y = y.unwrap();
        assert_eq!(y.shape(), &[1, 77, 768]);
        watch.join().unwrap()
    });
    if cfg!(target_os = "linux") {
        assert!(before > 0, "/proc/self/task unreadable");
        // The watcher is the one thread more.
        assert_eq!(most, before + 1, "{before} threads before the forward");
    }
    // Nor did anything start rayon's global pool.
    ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("rayon's global pool not yet built");
}
