//! The wgpu backend on a caller's own device and buffers, and wgpu errors
//! returned as `Err` (wgpu's default handler would panic).
#![cfg(feature = "wgpu")]

use std::sync::Arc;

use output_projector::ops::{Activation, Backend};
use output_projector::signal::SignalPositions;
use output_projector::tensor::HostTensor;
use output_projector::wgpu::{Gpu, Wgpu, WgpuOptions};

fn gpu() -> Option<Arc<Gpu>> {
    match output_projector::wgpu::open() {
        Ok(g) => Some(Arc::new(g)),
        Err(e) if std::env::var("REQUIRE_WGPU").as_deref() == Ok("1") => {
            panic!("REQUIRE_WGPU=1 but no wgpu adapter: {e}")
        }
        Err(e) => {
            println!("skipped: wgpu unavailable: {e}");
            None
        }
    }
}

fn caller_buffer(gpu: &Gpu, bytes: u64) -> wgpu::Buffer {
    gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("caller's"),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

#[test]
fn runs_on_a_callers_device() {
    if gpu().is_none() {
        return;
    }
    // The caller opens the device with plain wgpu.
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
            .unwrap();
    let (device, queue) =
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default())).unwrap();
    let gpu = Arc::new(Gpu::from_device(&adapter.get_info(), device, queue));
    let be = Wgpu::new(gpu, WgpuOptions::default()).unwrap();
    let hidden = HostTensor::from_f32(vec![1, 3, 4], (0..12).map(|i| i as f32).collect()).unwrap();
    let pos = SignalPositions::find(&[5, 9, 7], 1, 3, &[9, 7]).unwrap();
    let mut out = be.alloc(&[1, 2, 4]).unwrap();
    be.gather_signal_tokens(&be.upload(&hidden).unwrap(), None, &pos, &mut out)
        .unwrap();
    let got = be.download(&out).unwrap().to_f32_vec();
    assert_eq!(got, vec![4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
}

#[test]
fn reads_and_writes_callers_buffers_at_offsets() {
    let Some(gpu) = gpu() else { return };
    let be = Wgpu::new(Arc::clone(&gpu), WgpuOptions::default()).unwrap();
    let align = u64::from(gpu.limits.min_storage_buffer_offset_alignment);
    let input = caller_buffer(&gpu, align + 64);
    let data: Vec<f32> = (0..8).map(|i| 10.0 + i as f32).collect();
    gpu.queue
        .write_buffer(&input, align, bytemuck::cast_slice(&data));
    let output = caller_buffer(&gpu, align + 32);
    let hidden = be.tensor_from_buffer(input, align, &[2, 1, 4]).unwrap();
    let mut out = be
        .tensor_from_buffer(output.clone(), align, &[2, 1, 4])
        .unwrap();
    let pos = SignalPositions::all(2, 1).unwrap();
    be.gather_signal_tokens(&hidden, None, &pos, &mut out)
        .unwrap();
    assert_eq!(be.download(&out).unwrap().to_f32_vec(), data);
    // The caller's buffer itself holds the result at its offset.
    let raw = gpu.read_buffer_after(None, &output, align, 32).unwrap();
    assert_eq!(bytemuck::cast_slice::<u8, f32>(&raw), data.as_slice());
}

/// A read of 0 bytes after an encoder still runs the encoder's commands.
#[test]
fn an_empty_read_after_an_encoder_runs_its_commands() {
    let Some(gpu) = gpu() else { return };
    let (from, to) = (caller_buffer(&gpu, 16), caller_buffer(&gpu, 16));
    let data = [1.0f32, 2.0, 3.0, 4.0];
    gpu.queue
        .write_buffer(&from, 0, bytemuck::cast_slice(&data));
    let mut encoder = gpu
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
    encoder.copy_buffer_to_buffer(&from, 0, &to, 0, 16);
    let nothing = gpu.read_buffer_after(Some(encoder), &to, 0, 0).unwrap();
    assert!(nothing.is_empty());
    let raw = gpu.read_buffer(&to, 16).unwrap();
    assert_eq!(bytemuck::cast_slice::<u8, f32>(&raw), data.as_slice());
}

/// An engine's own f16 weight, already on the device, used as `linear`'s
/// weight without a copy: packed two to a word, an odd count of them (the
/// last word half used), at an offset.
#[test]
fn reads_a_callers_16_bit_weight() {
    use output_projector::ops::Activation;
    use output_projector::wgpu::WeightType;
    let Some(gpu) = gpu() else { return };
    let options = WgpuOptions {
        weights: WeightType::F16,
        ..WgpuOptions::default()
    };
    let be = Wgpu::new(Arc::clone(&gpu), options).unwrap();
    let align = u64::from(gpu.limits.min_storage_buffer_offset_alignment);
    // w [3, 5] = 0.5 (i - 7), every value exact in f16.
    let w: Vec<f32> = (0..15).map(|i| 0.5 * (i as f32 - 7.0)).collect();
    let mut bits: Vec<u16> = w
        .iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect();
    bits.push(0); // whole words to write
    let buffer = caller_buffer(&gpu, align + 32);
    gpu.queue
        .write_buffer(&buffer, align, bytemuck::cast_slice(&bits));
    let wt = be.weight_from_buffer(buffer, align, &[3, 5]).unwrap();
    let x: Vec<f32> = (0..10).map(|i| i as f32).collect();
    let xt = be
        .upload(&HostTensor::from_f32(vec![2, 5], x.clone()).unwrap())
        .unwrap();
    let mut out = be.alloc(&[2, 3]).unwrap();
    be.linear(&xt, &wt, None, Activation::None, None, &mut out)
        .unwrap();
    let want: Vec<f32> = (0..6)
        .map(|o| (0..5).map(|k| x[o / 3 * 5 + k] * w[o % 3 * 5 + k]).sum())
        .collect();
    assert_eq!(be.download(&out).unwrap().to_f32_vec(), want);
    // A buffer short of the 30 bytes is refused.
    let short = caller_buffer(&gpu, 28);
    let e = be.weight_from_buffer(short, 0, &[3, 5]).err().unwrap();
    assert!(e.to_string().contains("too small"), "{e}");
}

#[test]
fn unusable_buffers_are_refused() {
    let Some(gpu) = gpu() else { return };
    let be = Wgpu::new(Arc::clone(&gpu), WgpuOptions::default()).unwrap();
    let uniform = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::UNIFORM,
        mapped_at_creation: false,
    });
    let e = be.tensor_from_buffer(uniform, 0, &[4]).err().unwrap();
    assert!(e.to_string().contains("usage"), "{e}");
    let small = caller_buffer(&gpu, 16);
    let e = be.tensor_from_buffer(small.clone(), 0, &[5]).err().unwrap();
    assert!(e.to_string().contains("too small"), "{e}");
    let e = be.tensor_from_buffer(small.clone(), 4, &[1]).err().unwrap();
    assert!(e.to_string().contains("alignment"), "{e}");
    assert!(be.tensor_from_buffer(small, 0, &[usize::MAX, 2]).is_err());
}

#[test]
fn a_wgpu_validation_error_is_an_err_and_the_backend_recovers() {
    let Some(gpu) = gpu() else { return };
    let be = Wgpu::new(Arc::clone(&gpu), WgpuOptions::default()).unwrap();
    // Output and input in one buffer: a writable binding aliasing a read-only one
    // is a validation error in WebGPU.
    let shared = caller_buffer(&gpu, 64);
    let hidden = be
        .tensor_from_buffer(shared.clone(), 0, &[1, 2, 2])
        .unwrap();
    let mut out = be.tensor_from_buffer(shared, 0, &[1, 2, 2]).unwrap();
    let pos = SignalPositions::all(1, 2).unwrap();
    let result = be
        .gather_signal_tokens(&hidden, None, &pos, &mut out)
        .and_then(|()| be.synchronize());
    let e = result.expect_err("aliased bindings must be reported");
    assert!(matches!(e, output_projector::Error::Backend { .. }), "{e}");
    // The backend still works afterwards.
    let h = be
        .upload(&HostTensor::from_f32(vec![1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap())
        .unwrap();
    let mut o = be.alloc(&[1, 2, 2]).unwrap();
    be.gather_signal_tokens(&h, None, &pos, &mut o).unwrap();
    assert_eq!(
        be.download(&o).unwrap().to_f32_vec(),
        vec![1.0, 2.0, 3.0, 4.0]
    );
}

/// More dispatches than the parameter arena has slots (512) between two
/// downloads: the backend submits what is recorded whenever the arena fills,
/// and every dispatch still reads its own parameters. 1200 chained linears
/// `a <- x wᵀ + a` in small integers, exact in f32.
#[test]
fn more_dispatches_than_the_parameter_arena_holds() {
    use output_projector::ops::Activation;
    let Some(gpu) = gpu() else { return };
    let be = Wgpu::new(gpu, WgpuOptions::default()).unwrap();
    let x = be.upload(&HostTensor::from_f32(vec![1, 3], vec![1.0, 2.0, 3.0]).unwrap());
    // x wᵀ = [6, 3, -1]
    let w = HostTensor::from_f32(
        vec![3, 3],
        vec![1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, -1.0, 0.0],
    );
    let (x, w) = (x.unwrap(), be.upload(&w.unwrap()).unwrap());
    let zeros = HostTensor::from_f32(vec![1, 3], vec![0.0; 3]).unwrap();
    let (mut a, mut b) = (be.upload(&zeros).unwrap(), be.upload(&zeros).unwrap());
    let before = be.submits();
    let made = be.bind_groups_made();
    let steps = 1200;
    for _ in 0..steps {
        be.linear(&x, &w, None, Activation::None, Some(&a), &mut b)
            .unwrap();
        std::mem::swap(&mut a, &mut b);
    }
    let got = be.download(&a).unwrap().to_f64_vec();
    let n = steps as f64;
    assert_eq!(got, vec![6.0 * n, 3.0 * n, -n]);
    // Two full arenas and the download's submit.
    assert_eq!(be.submits() - before, 3);
    // Every step binds (a, b) or (b, a): two bind groups, each step's
    // parameters at its own offset into the arena.
    assert_eq!(be.bind_groups_made() - made, 2);
}

/// A plan's forwards bind the same buffer ranges each time: after the first,
/// they make no bind group, and their results are those of a backend that
/// made every bind group afresh. Both tunings: the GPU one splits the small
/// GEMMs over K, with pooled scratch for the slices.
#[test]
fn a_plans_forwards_reuse_their_bind_groups() {
    use output_projector::config::ProjectorConfig;
    use output_projector::projector::Projector;
    use output_projector::weights::ProjectorWeights;
    use output_projector::wgpu::Tuning;
    let Some(gpu) = gpu() else { return };
    // 18 decoder rows: tiled GEMMs, and the FFN's K = 256 splits in two.
    let config = ProjectorConfig {
        n_out: 9,
        ffn_dim: 256,
        ..small_config()
    };
    let w = ProjectorWeights::random(config, None, 1).unwrap();
    for tuning in [Tuning::Cpu, Tuning::Gpu] {
        let options = WgpuOptions {
            tuning,
            ..WgpuOptions::default()
        };
        let be = Wgpu::new(Arc::clone(&gpu), options).unwrap();
        let proj = Projector::new(be.clone(), &w).unwrap();
        let input = |seed| {
            let h = HostTensor::randn(vec![2, 4, 64], seed, "hidden").unwrap();
            be.upload(&h).unwrap()
        };
        let (a, b) = (input(3), input(5));
        let mut plan = proj.plan(2, 4).unwrap();
        let mut run = |x| {
            let (made, dispatched) = (be.bind_groups_made(), be.dispatches());
            let y = proj.forward_with(&mut plan, x, None).unwrap();
            let y = be.download(y).unwrap().to_f32_vec();
            (
                y,
                be.bind_groups_made() - made,
                be.dispatches() - dispatched,
            )
        };
        let (first, made, dispatched) = run(&a);
        assert!(
            made > 0 && made <= dispatched,
            "{tuning:?}: {made} of {dispatched}"
        );
        let (again, made, _) = run(&a);
        assert_eq!(
            made, 0,
            "{tuning:?}: the same forward made bind groups again"
        );
        assert_eq!(again, first, "{tuning:?}");
        // Another input: only the dispatches that read it bind anew.
        let (other, made, dispatched) = run(&b);
        assert!(
            made > 0 && made < dispatched / 4,
            "{tuning:?}: {made} of {dispatched}"
        );
        let fresh = Wgpu::new(Arc::clone(&gpu), options).unwrap();
        let proj = Projector::new(fresh.clone(), &w).unwrap();
        let h = fresh
            .upload(&HostTensor::randn(vec![2, 4, 64], 5, "hidden").unwrap())
            .unwrap();
        let expected = fresh.download(&proj.forward(&h, None).unwrap()).unwrap();
        assert_eq!(other, expected.to_f32_vec(), "{tuning:?}");
        assert_ne!(other, first, "{tuning:?}");
    }
}

/// Threads sharing one backend, each with a plan of its own, get what one
/// thread alone gets: the arena, the buffer pool and the bind-group cache
/// keep each forward's buffers to itself.
#[test]
fn threads_share_a_backend_each_with_a_plan() {
    use output_projector::projector::Projector;
    use output_projector::weights::ProjectorWeights;
    use output_projector::wgpu::Tuning;
    let Some(gpu) = gpu() else { return };
    let options = WgpuOptions {
        tuning: Tuning::Gpu, // split-K scratch from the pool as well
        ..WgpuOptions::default()
    };
    let be = Wgpu::new(gpu, options).unwrap();
    let w = ProjectorWeights::random(small_config(), None, 1).unwrap();
    let proj = Projector::new(be.clone(), &w).unwrap();
    let inputs: Vec<_> = (0..3)
        .map(|seed| HostTensor::randn(vec![2, 4, 64], 10 + seed, "hidden").unwrap())
        .collect();
    let alone: Vec<Vec<f32>> = inputs
        .iter()
        .map(|h| {
            let y = proj.forward(&be.upload(h).unwrap(), None).unwrap();
            be.download(&y).unwrap().to_f32_vec()
        })
        .collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..3)
            .map(|t| {
                let (proj, be, inputs, alone) = (&proj, &be, &inputs, &alone);
                scope.spawn(move || {
                    let mut plan = proj.plan(2, 4).unwrap();
                    for round in 0..12 {
                        let i = (t + round) % inputs.len();
                        // The input dropped before the forward is submitted:
                        // its buffer must not take another thread's upload
                        // before then.
                        let x = be.upload(&inputs[i]).unwrap();
                        let y = proj.forward_with(&mut plan, &x, None).unwrap();
                        drop(x);
                        let got = be.download(y).unwrap().to_f32_vec();
                        assert_eq!(got, alone[i], "thread {t}, round {round}");
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    });
}

/// A bind group over a caller's buffer is let go with the tensor over it,
/// so the cache never keeps the caller's memory alive; pooled tensors' bind
/// groups stay, up to the cache's bound.
#[test]
fn cached_bind_groups_let_a_callers_buffer_go() {
    let Some(gpu) = gpu() else { return };
    let be = Wgpu::new(Arc::clone(&gpu), WgpuOptions::default()).unwrap();
    let pos = SignalPositions::all(1, 1).unwrap();
    let pooled = be
        .upload(&HostTensor::from_f32(vec![1, 1, 4], vec![1.0; 4]).unwrap())
        .unwrap();
    let theirs = be
        .tensor_from_buffer(caller_buffer(&gpu, 16), 0, &[1, 1, 4])
        .unwrap();
    let mut out = be.alloc(&[1, 1, 4]).unwrap();
    let held = be.bind_groups_held().unwrap();
    be.gather_signal_tokens(&pooled, None, &pos, &mut out)
        .unwrap();
    be.gather_signal_tokens(&theirs, None, &pos, &mut out)
        .unwrap();
    be.synchronize().unwrap();
    assert_eq!(be.bind_groups_held().unwrap(), held + 2);
    drop(theirs);
    assert_eq!(be.bind_groups_held().unwrap(), held + 1);
    // Past the bound the cache starts again rather than grow.
    let outs: Vec<_> = (0..4100).map(|_| be.alloc(&[1, 1, 4]).unwrap()).collect();
    for mut o in outs {
        be.gather_signal_tokens(&pooled, None, &pos, &mut o)
            .unwrap();
        assert!(be.bind_groups_held().unwrap() <= 4096);
    }
    be.synchronize().unwrap();
}

fn small_config() -> output_projector::config::ProjectorConfig {
    use output_projector::config::{ProjectorConfig, Variant};
    ProjectorConfig {
        variant: Variant::Legacy,
        in_dim: 64,
        d_model: 32,
        heads: 4,
        ffn_dim: 64,
        encoder_layers: 4,
        decoder_layers: 4,
        n_out: 7,
        out_dim: 16,
        n_in: None,
        eps: 1e-5,
    }
}

#[test]
fn a_projector_forward_is_one_submit_and_its_bind_groups_settle() {
    use output_projector::projector::Projector;
    use output_projector::weights::ProjectorWeights;
    let Some(gpu) = gpu() else { return };
    let be = Wgpu::new(gpu, WgpuOptions::default()).unwrap();
    let w = ProjectorWeights::random(small_config(), None, 1).unwrap();
    let proj = Projector::new(be.clone(), &w).unwrap();
    let hidden = be
        .upload(&HostTensor::randn(vec![2, 4, 64], 3, "hidden").unwrap())
        .unwrap();
    let embeds = be
        .upload(&HostTensor::randn(vec![2, 4, 64], 4, "embeds").unwrap())
        .unwrap();
    let mut made = Vec::new();
    for _ in 0..6 {
        let before = be.submits();
        let groups = be.bind_groups_made();
        let y = proj.forward(&hidden, Some(&embeds)).unwrap();
        made.push(be.bind_groups_made() - groups);
        let out = be.download(&y).unwrap();
        assert_eq!(out.shape(), &[2, 7, 16]);
        assert_eq!(
            be.submits() - before,
            1,
            "forward + readback must be one submit"
        );
    }
    // Without a plan, each forward's buffers come from the pool; once it
    // holds them all, they come in the same order, and so do the bind groups.
    assert_eq!(
        made.last(),
        Some(&0),
        "bind groups made per forward: {made:?}"
    );
}

#[test]
fn device_time_comes_from_timestamps_where_offered() {
    let Some(gpu) = gpu() else { return };
    let offered = gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY);
    let be = Wgpu::new(gpu, WgpuOptions::default()).unwrap();
    let hidden = be
        .upload(&HostTensor::randn(vec![4, 64, 1024], 1, "hidden").unwrap())
        .unwrap();
    let pos = SignalPositions::all(4, 64).unwrap();
    let mut out = be.alloc(&[4, 64, 1024]).unwrap();
    let ((), t) = be
        .time_on_device(|| be.gather_signal_tokens(&hidden, None, &pos, &mut out))
        .unwrap();
    assert_eq!(t.is_some(), offered, "{t:?}");
    if let Some(t) = t {
        assert!(t.as_nanos() > 0 && t.as_secs() < 10, "{t:?}");
    }
    // Nothing dispatched: nothing to time.
    let ((), none) = be.time_on_device(|| Ok(())).unwrap();
    assert!(none.is_none());
}

#[test]
fn a_tensor_past_the_largest_binding_is_a_clear_error() {
    let Some(gpu) = gpu() else { return };
    let limit = gpu.limits.max_storage_buffer_binding_size;
    if limit > 1 << 30 || limit >= gpu.limits.max_buffer_size {
        // A real GPU's limit is gigabytes (lavapipe's is 128 MiB): too much
        // memory for a test, or no buffer could exceed it.
        println!("skipped: a binding may span {limit} bytes here");
        return;
    }
    let be = Wgpu::new(Arc::clone(&gpu), WgpuOptions::default()).unwrap();
    // w [n, 4] of f32 spans 16 n bytes: 64 rows past the limit.
    let n = (limit / 16) as usize + 64;
    let x = be
        .upload(&HostTensor::from_f32(vec![4, 4], vec![1.0; 16]).unwrap())
        .unwrap();
    let w = be
        .upload_weight(&HostTensor::from_f32(vec![n, 4], vec![0.5; 4 * n]).unwrap())
        .unwrap();
    let mut out = be.alloc(&[4, n]).unwrap();
    let e = be
        .linear(&x, &w, None, Activation::None, None, &mut out)
        .expect_err("a binding past the device's limit");
    let message = e.to_string();
    assert!(
        matches!(e, output_projector::Error::OutOfMemory(_))
            && message.contains(&format!("[{n}, 4]"))
            && message.contains("max_storage_buffer_binding_size"),
        "{message}"
    );
    // Nothing was recorded: the backend goes on, and a GEMM of the weight's
    // first rows (a tensor of their own) is right.
    drop((w, out));
    let w = be
        .upload_weight(&HostTensor::from_f32(vec![3, 4], vec![0.5; 12]).unwrap())
        .unwrap();
    let mut out = be.alloc(&[4, 3]).unwrap();
    be.linear(&x, &w, None, Activation::None, None, &mut out)
        .unwrap();
    assert_eq!(be.download(&out).unwrap().to_f32_vec(), vec![2.0; 12]);
}
