//! `outproj`: run, check and benchmark the NExT-GPT output projector.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use output_projector::bench::{self, OpCase, Rotation};
use output_projector::config::{Modality, ProjectorConfig, Variant};
#[cfg(feature = "cuda")]
use output_projector::cuda::{Cuda, CudaOptions, CudaTensor, ProjectorGraph};
use output_projector::device::{self, BackendTask, DeviceKind, Precision};
use output_projector::golden;
use output_projector::ops::Backend;
#[cfg(feature = "cuda")]
use output_projector::ops::Shaped;
use output_projector::projector::Projector;
use output_projector::signal::SignalPositions;
use output_projector::tensor::{DType, HostTensor};
use output_projector::verify;
use output_projector::weights::{self, ProjectorWeights, Selection, TensorFile};
use output_projector::{Error, Result};

#[derive(Parser)]
#[command(
    name = "outproj",
    version,
    about = "The NExT-GPT output projector on CUDA, wgpu or the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone, Debug)]
struct ModelArgs {
    /// Projector weights: safetensors, a PyTorch checkpoint (`torch.save`, e.g.
    /// NExT-GPT's `pytorch_model.pt`) or the `*.index.json` of a sharded one; a whole
    /// NExT-GPT checkpoint is fine.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// auto, cpu, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// image, video or audio: picks the projector in a checkpoint and checks its
    /// shapes against that preset (default for random weights: image).
    #[arg(long)]
    modality: Option<String>,
    /// legacy (the released model) or v1.5 (default for random weights: legacy).
    #[arg(long)]
    variant: Option<String>,
    /// The checkpoint key prefix, e.g. `gen_text_hidden_fcs.0.` ("" for none).
    #[arg(long)]
    prefix: Option<String>,
    /// Attention heads (the shapes cannot tell; default 4).
    #[arg(long, allow_negative_numbers = true)]
    heads: Option<usize>,
    /// Number format: f32, tf32 (CUDA), f16 (CUDA, wgpu, the CPU's GEMMs) or bf16 (CUDA, the GEMMs' weights on wgpu and the CPU); sums are f32.
    #[arg(long, default_value = "f32")]
    precision: String,
}

#[derive(Subcommand)]
enum Command {
    /// Which backends and devices exist here, and why a missing one is missing; with
    /// --weights, the projectors a checkpoint holds instead.
    Info {
        /// A checkpoint (safetensors, `torch.save` or `*.index.json`): list each
        /// projector in it, with its prefix, preset, storage type and shapes.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Attention heads (the shapes cannot tell; default 4).
        #[arg(long)]
        heads: Option<usize>,
    },
    /// Project signal-token states into diffusion conditioning.
    Run {
        #[command(flatten)]
        model: ModelArgs,
        /// Input (safetensors or `torch.save`): `hidden` [B, n_in, in_dim] and optional
        /// `embeds` (same shape); or full LLM outputs: `hidden` [B, T, in_dim], optional
        /// `embeds`, `token_ids` [B, T] and the signal tokens' ids (`signal_ids` or
        /// --signal-ids), which are found in each sequence and gathered.
        #[arg(long)]
        input: Option<PathBuf>,
        /// The signal tokens' ids in order (e.g. those of `[IMG0]`..`[IMG3]`),
        /// comma-separated: with `token_ids` in --input, instead of its `signal_ids`.
        #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
        signal_ids: Option<Vec<i64>>,
        /// Output safetensors; receives `conditioning` [B, n_out, out_dim].
        #[arg(long)]
        output: Option<PathBuf>,
        /// Output dtype: f64, f32, f16 or bf16. Default: f64 on the CPU reference
        /// (its own precision), f32 on a GPU.
        #[arg(long)]
        out_dtype: Option<String>,
        /// Batch size of the random input (when no --input).
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        batch: usize,
        /// Seed of the random weights and input.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        seed: u64,
    },
    /// Every available backend against PyTorch's golden outputs and the CPU reference.
    Check {
        /// Check only this backend (auto, cpu, wgpu, cuda); default: all available.
        #[arg(long)]
        device: Option<String>,
        /// Number format: f32, tf32 (CUDA), f16 (CUDA, wgpu, the CPU's GEMMs) or bf16 (CUDA, the GEMMs' weights on wgpu and the CPU).
        #[arg(long, default_value = "f32")]
        precision: String,
    },
    /// Time the projector and each op at the projector's shapes.
    Bench {
        /// Backend(s) to time; default: all available.
        #[arg(long)]
        device: Option<String>,
        /// image, video or audio preset.
        #[arg(long, default_value = "image")]
        modality: String,
        /// Comma-separated batch sizes.
        #[arg(long, default_value = "1", allow_negative_numbers = true)]
        batch: String,
        /// Seconds to spend on each measurement (at least 3 runs).
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        seconds: f64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Number format: f32, tf32 (CUDA), f16 (CUDA, wgpu, the CPU's GEMMs) or bf16 (CUDA, the GEMMs' weights on wgpu and the CPU).
        #[arg(long, default_value = "f32")]
        precision: String,
    },
    /// Registers, shared memory and spill bytes of each CUDA kernel.
    Kernels {
        /// Target architecture, e.g. sm_80, or sm_90a (what an H100 or H200
        /// is compiled for); `native`: what the backend compiles for on
        /// device 0.
        #[arg(long, default_value = "sm_90a")]
        arch: String,
        /// Also write each compiled CUBIN here, as `<file>-<storage>-<arch>.cubin`
        /// (for `cuobjdump -sass` or `nvdisasm`).
        #[arg(long)]
        cubin_dir: Option<PathBuf>,
        /// Also store each CUBIN in this kernel cache folder, where a backend
        /// with `OUTPROJ_KERNEL_CACHE` set to it finds them instead of
        /// compiling (a deployment's cache filled ahead of time). Without a
        /// folder: the one `OUTPROJ_KERNEL_CACHE` names, else the default
        /// (`OUTPROJ_KERNEL_CACHE=1`'s).
        #[arg(long, num_args = 0..=1, value_name = "DIR")]
        kernel_cache: Option<Option<PathBuf>>,
    },
}

fn main() -> ExitCode {
    // Mesa's Vulkan device-select layer prints errors of its own when it finds no
    // display; wgpu picks the adapter itself. Set before any thread starts.
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // clap would print the whole help; one line says what is missing.
            let cmd = <Cli as clap::CommandFactory>::command();
            let names: Vec<&str> = cmd.get_subcommands().map(|c| c.get_name()).collect();
            eprintln!(
                "error: no command given (expected one of: {}); see `outproj --help`",
                names.join(", ")
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            let msg = e.to_string();
            eprintln!("{}", msg.lines().next().unwrap_or("invalid arguments"));
            return ExitCode::from(2);
        }
    };
    // A bug must still end in one line and a non-zero status, never a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".into());
        let at = info
            .location()
            .map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
        eprintln!(
            "error: internal error (a bug; please report it){at}: {}",
            one_line(&what)
        );
    }));
    match std::panic::catch_unwind(|| dispatch(cli)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::from(70),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Info { weights: None, .. } => info(),
        Command::Info {
            weights: Some(path),
            heads,
        } => list_projectors(&path, heads),
        Command::Run {
            model,
            input,
            signal_ids,
            output,
            out_dtype,
            batch,
            seed,
        } => run(&model, input, signal_ids, output, out_dtype, batch, seed),
        Command::Check { device, precision } => check(device, Precision::parse(&precision)?),
        Command::Bench {
            device,
            modality,
            batch,
            seconds,
            json,
            precision,
        } => bench(
            device,
            &modality,
            &batch,
            seconds,
            json,
            Precision::parse(&precision)?,
        ),
        Command::Kernels {
            arch,
            cubin_dir,
            kernel_cache,
        } => kernels(&arch, cubin_dir.as_deref(), kernel_cache),
    }
}

fn info() -> Result<ExitCode> {
    println!("outproj {}", env!("CARGO_PKG_VERSION"));
    for s in device::survey() {
        match &s.usable {
            Ok(what) => println!("{:<9} available: {what}", s.kind.name()),
            Err(why) => println!("{:<9} unavailable: {}", s.kind.name(), one_line(why)),
        }
        for d in &s.details {
            println!("          {}", one_line(d));
        }
        // What the backend does there, which takes opening it.
        #[cfg(feature = "cuda")]
        if s.kind == DeviceKind::Cuda && s.usable.is_ok() {
            match output_projector::cuda::Cuda::open() {
                Ok(be) => println!("          device 0 runs: {}", be.summary()),
                Err(e) => println!(
                    "          device 0: no backend: {}",
                    one_line(&e.to_string())
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Each projector in the checkpoint at `path`, one line each: its prefix, preset
/// (when its shapes are one), storage type, shapes and parameter count, or why it
/// does not load. An error when none loads.
fn list_projectors(path: &Path, heads: Option<usize>) -> Result<ExitCode> {
    let file = TensorFile::open(path)?;
    let prefixes = weights::projector_prefixes(&file);
    println!("{}: {} projector(s)", path.display(), prefixes.len());
    let mut loaded = 0;
    for prefix in &prefixes {
        let sel = Selection {
            prefix: Some(prefix.clone()),
            heads,
            ..Selection::default()
        };
        let shown = if prefix.is_empty() {
            "(no prefix)"
        } else {
            prefix
        };
        match ProjectorWeights::load(&file, &sel) {
            Ok(w) => {
                let c = w.config();
                let preset = w.modality().map_or("no preset", |m| m.name());
                let storage = w.get("query_embs")?.dtype().name();
                let n_in = c.n_in.map_or("any".to_string(), |n| n.to_string());
                println!(
                    "  {shown:<34} {preset:<9} {:<6} {storage:<4} n_in {n_in:<3} [B, n_in, {}] -> [B, {}, {}]  {} parameters",
                    c.variant.name(),
                    c.in_dim,
                    c.n_out,
                    c.out_dim,
                    c.parameter_count()?
                );
                loaded += 1;
            }
            Err(e) => println!("  {shown:<34} does not load: {}", one_line(&e.to_string())),
        }
    }
    if loaded == 0 {
        return Err(Error::invalid(format!(
            "{}: no projector in it loads",
            path.display()
        )));
    }
    Ok(ExitCode::SUCCESS)
}

/// Backends to use for `check`/`bench`: the one asked for, or every usable one
/// that computes in `precision`.
fn backends(asked: Option<String>, precision: Precision) -> Result<Vec<DeviceKind>> {
    match asked {
        Some(d) => Ok(vec![device::resolve(DeviceKind::parse(&d)?)?]),
        None => {
            let kinds: Vec<DeviceKind> = device::survey()
                .into_iter()
                .filter(|s| s.usable.is_ok() && precision.runs_on(s.kind))
                .map(|s| s.kind)
                .collect();
            if kinds.is_empty() {
                return Err(Error::invalid(format!(
                    "--precision {}: no backend here computes in it",
                    precision.name()
                )));
            }
            Ok(kinds)
        }
    }
}

fn load_weights(m: &ModelArgs, seed: u64) -> Result<(ProjectorWeights, bool)> {
    let modality = m.modality.as_deref().map(Modality::parse).transpose()?;
    let variant = m.variant.as_deref().map(Variant::parse).transpose()?;
    if m.heads == Some(0) {
        return Err(Error::invalid("--heads must be at least 1"));
    }
    match &m.weights {
        Some(path) => {
            let file = TensorFile::open(path)?;
            let sel = Selection {
                prefix: m.prefix.clone(),
                modality,
                variant,
                heads: m.heads,
            };
            Ok((ProjectorWeights::load(&file, &sel)?, false))
        }
        None => {
            let modality = modality.unwrap_or(Modality::Image);
            let mut config = ProjectorConfig::preset(modality, variant.unwrap_or(Variant::Legacy));
            if let Some(h) = m.heads {
                config.heads = h;
            }
            Ok((
                ProjectorWeights::random(config, Some(modality), seed)?,
                true,
            ))
        }
    }
}

/// What `run --input` projects.
struct Input {
    hidden: HostTensor,
    embeds: Option<HostTensor>,
    /// Where the signal tokens are, when `hidden` holds whole sequences.
    positions: Option<SignalPositions>,
}

fn load_input(path: &PathBuf, signal_ids: Option<Vec<i64>>) -> Result<Input> {
    let file = TensorFile::open(path)?;
    let hidden = file.get("hidden")?;
    let embeds = if file.contains("embeds") {
        Some(file.get("embeds")?)
    } else {
        None
    };
    let whole = file.contains("token_ids");
    let &[batch, seq, _] = hidden.shape() else {
        return Err(Error::invalid(format!(
            "{}: `hidden` must be [batch, {}, in_dim], found shape {:?}",
            path.display(),
            if whole { "seq" } else { "n_in" },
            hidden.shape()
        )));
    };
    if let Some(e) = &embeds {
        e.check_shape("embeds", hidden.shape())?;
    }
    let positions = if whole {
        let (shape, token_ids) = file.get_ids("token_ids")?;
        if shape != [batch, seq] {
            return Err(Error::Shape {
                key: "token_ids".into(),
                expected: vec![batch, seq],
                found: shape,
            });
        }
        let signal_ids = match signal_ids {
            Some(ids) => ids,
            None if file.contains("signal_ids") => file.get_ids("signal_ids")?.1,
            None => {
                return Err(Error::invalid(format!(
                    "{}: `token_ids` needs the signal tokens' ids: --signal-ids, or `signal_ids` in the file",
                    path.display()
                )))
            }
        };
        Some(SignalPositions::find(&token_ids, batch, seq, &signal_ids)?)
    } else if signal_ids.is_some() || file.contains("signal_ids") {
        return Err(Error::invalid(format!(
            "{}: signal token ids are given, but no `token_ids` [batch, seq] to find them in",
            path.display()
        )));
    } else {
        None
    };
    Ok(Input {
        hidden,
        embeds,
        positions,
    })
}

/// One forward: the conditioning and the forward's own time.
struct Project<'a> {
    weights: &'a ProjectorWeights,
    input: &'a Input,
}

impl BackendTask for Project<'_> {
    type Output = (HostTensor, Duration);

    fn run<B>(self, be: B, _: DeviceKind) -> Result<Self::Output>
    where
        B: Backend + Send + Sync,
        B::Tensor: Send + Sync,
        B::Mask: Send + Sync,
    {
        let proj = Projector::new(be.clone(), self.weights)?;
        let h = be.upload(&self.input.hidden)?;
        let e = self
            .input
            .embeds
            .as_ref()
            .map(|e| be.upload(e))
            .transpose()?;
        be.synchronize()?;
        let t = Instant::now();
        let y = match &self.input.positions {
            Some(p) => proj.forward_at(&h, e.as_ref(), p)?,
            None => proj.forward(&h, e.as_ref())?,
        };
        be.synchronize()?;
        let elapsed = t.elapsed();
        Ok((be.download(&y)?, elapsed))
    }
}

fn run(
    m: &ModelArgs,
    input: Option<PathBuf>,
    signal_ids: Option<Vec<i64>>,
    output: Option<PathBuf>,
    out_dtype: Option<String>,
    batch: usize,
    seed: u64,
) -> Result<ExitCode> {
    let kind = device::resolve(DeviceKind::parse(&m.device)?)?;
    let precision = Precision::parse(&m.precision)?;
    let out_dtype = match out_dtype {
        Some(s) => DType::parse(&s)?,
        None if kind == DeviceKind::Reference => DType::F64,
        None => DType::F32,
    };
    let t_load = Instant::now();
    let (w, random_weights) = load_weights(m, seed)?;
    let c = w.config().clone();
    let data = match &input {
        Some(path) => load_input(path, signal_ids)?,
        None if signal_ids.is_some() => {
            return Err(Error::invalid(
                "--signal-ids needs an --input with `token_ids` to find them in",
            ))
        }
        None => {
            if batch == 0 {
                return Err(Error::invalid("--batch must be at least 1"));
            }
            let n_in = c.n_in.unwrap_or(4);
            let shape = vec![batch, n_in, c.in_dim];
            let hidden = HostTensor::randn(shape.clone(), seed.wrapping_add(1), "--batch")?;
            let embeds = HostTensor::randn(shape, seed.wrapping_add(2), "--batch")?;
            Input {
                hidden,
                embeds: Some(embeds),
                positions: None,
            }
        }
    };
    data.hidden.check_finite("hidden")?;
    if let Some(e) = &data.embeds {
        e.check_finite("embeds")?;
    }
    let load_time = t_load.elapsed();
    let task = Project {
        weights: &w,
        input: &data,
    };
    let (y, fwd_time) = device::run_on_with(kind, precision, task)?;
    y.check_finite("conditioning")?;

    let name = w
        .modality()
        .map_or("custom".to_string(), |m| m.name().to_string());
    if random_weights {
        println!("note: no --weights given: seeded random weights (PyTorch's initialisation, seed {seed})");
    }
    if input.is_none() {
        println!(
            "note: no --input given: seeded random hidden states and embeddings (seeds {} and {})",
            seed.wrapping_add(1),
            seed.wrapping_add(2)
        );
    }
    if let Some(p) = &data.positions {
        let n = p.count();
        println!(
            "signal tokens: {n} gathered from each of {} sequences of {} tokens (sequence 0 at {:?})",
            p.batch(),
            p.seq_len(),
            p.positions().iter().take(n).collect::<Vec<_>>()
        );
    }
    println!(
        "projector: {name} ({}), in_dim {}, d_model {}, {} heads, {}+{} layers, {} parameters",
        c.variant.name(),
        c.in_dim,
        c.d_model,
        c.heads,
        c.encoder_layers,
        c.decoder_layers,
        c.parameter_count()?
    );
    let v = y.to_f64_vec();
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / v.len() as f64).sqrt();
    println!(
        "conditioning: {:?} on {} ({}): mean {mean:.6}, std {std:.6}, first {:?}",
        y.shape(),
        kind.name(),
        if kind == DeviceKind::Reference {
            "f64"
        } else {
            precision.name()
        },
        v.iter()
            .take(4)
            .map(|x| (x * 1e6).round() / 1e6)
            .collect::<Vec<_>>()
    );
    println!(
        "time: load {:.1} ms, forward {:.1} ms",
        load_time.as_secs_f64() * 1e3,
        fwd_time.as_secs_f64() * 1e3
    );
    if let Some(path) = output {
        let mut t = BTreeMap::new();
        t.insert("conditioning".to_string(), y.to_dtype(out_dtype));
        let meta = HashMap::from([("device".to_string(), kind.name().to_string())]);
        weights::save(&path, &t, Some(meta))?;
        println!(
            "wrote {} (conditioning, {})",
            path.display(),
            out_dtype.name()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One line of `outproj check`.
struct CheckRow {
    against: &'static str,
    op: &'static str,
    case: String,
    rel: f64,
    max_abs: f64,
    tol: f64,
}

/// Every check of one backend: PyTorch's golden outputs, then (for a GPU
/// backend, fast and naive kernels) the reference on random awkward shapes, and
/// whole projectors: the presets (on CUDA, also replayed from a CUDA graph)
/// and the worst of [`RANDOM_PROJECTORS`] drawn at random.
struct Check {
    precision: Precision,
}

/// Cases of [`random_rows`].
const RANDOM_CASES: usize = 200;

/// Projectors of shapes drawn at random ([`verify::random_projectors`], every
/// norm and attention bias drawn too) that `check` compares, reporting the
/// one furthest past its bound ([`verify::worst_projector`]).
const RANDOM_PROJECTORS: usize = 40;

/// Every op at [`RANDOM_CASES`] sizes drawn at random
/// ([`verify::random_cases`]) against the reference, inputs rounded to
/// `precision`'s storage: one row per op, its worst case (a NaN worst of all)
/// against its bound. In f32 the bound is [`verify::f32_tolerance`]; in
/// 16 bits and TF32 it is `tol`, or for a case past it, where one rounding
/// can move a tiny output by more, [`verify::rounded_bound`].
fn random_rows<B: Backend>(
    be: &B,
    suffix: &str,
    precision: Precision,
    tol: f64,
) -> Result<Vec<CheckRow>> {
    let cases = verify::random_cases(53, RANDOM_CASES);
    let storage = precision.storage();
    let mut rows = Vec::new();
    for op in verify::OPS {
        // The case furthest past its bound, and that bound.
        let mut worst: Option<(verify::Comparison, f64)> = None;
        let mut n = 0;
        for (i, case) in cases.iter().filter(|c| c.op() == op).enumerate() {
            let seed = 2000 + i as u64;
            let c = verify::compare_case(be, case, storage, seed)?;
            let bound = match precision {
                Precision::F32 => verify::f32_tolerance(op),
                // The spread costs four runs of the reference: only past `tol`.
                _ if c.rel <= tol => tol,
                _ => verify::rounded_bound(case, storage, seed, tol, precision.epsilon())?,
            };
            n += 1;
            // A NaN is worse than any number.
            let worse =
                |(w, b): &(verify::Comparison, f64)| c.rel.is_nan() || c.rel / bound > w.rel / b;
            if worst.as_ref().is_none_or(worse) {
                worst = Some((c, bound));
            }
        }
        if let Some((mut w, bound)) = worst {
            w.case = format!("worst of {n} random sizes: {}{suffix}", w.case);
            rows.push(check_row("reference", w, bound));
        }
    }
    Ok(rows)
}

/// A comparison as a `check` row against `against`, within `tol`.
fn check_row(against: &'static str, c: verify::Comparison, tol: f64) -> CheckRow {
    CheckRow {
        against,
        op: c.op,
        case: c.case,
        rel: c.rel,
        max_abs: c.max_abs,
        tol,
    }
}

impl BackendTask for Check {
    type Output = Vec<CheckRow>;

    fn run<B>(self, be: B, kind: DeviceKind) -> Result<Vec<CheckRow>>
    where
        B: Backend + Send + Sync,
        B::Tensor: Send + Sync,
        B::Mask: Send + Sync,
    {
        // f32 kernels against float64: 1e-5 per op, 1e-4 through 8 layers; the
        // float64 reference itself agrees with PyTorch to ~1e-13.
        let (op_tol, model_tol) = if kind == DeviceKind::Reference {
            (1e-10, 1e-10)
        } else {
            self.precision.tolerances()
        };
        let storage = self.precision.storage();
        let row = check_row;
        // PyTorch's fixtures are float64: an f32 backend first rounds them, which
        // alone moves an ill-conditioned case (layer_norm of rows with mean 1000)
        // by ~2e-5. Kernel accuracy proper is the 1e-5 check below against the
        // reference on identically rounded inputs.
        // 16-bit storage cannot hold those rows at all (f16 steps are 0.5 at
        // 1000): the fixtures are checked in f32 and TF32 only.
        let golden_tol = if kind == DeviceKind::Reference {
            1e-10
        } else {
            model_tol.max(1e-4)
        };
        let mut rows: Vec<CheckRow> = Vec::new();
        if storage == DType::F32 {
            rows.extend(
                golden::run_all(&be)?
                    .into_iter()
                    .map(|c| row("pytorch", c, golden_tol)),
            );
        }
        if kind == DeviceKind::Reference {
            return Ok(rows);
        }
        let mut variants = vec![("", be.clone())];
        if let Some(naive) = be.naive()? {
            variants.push((" (v1)", naive));
        }
        for (suffix, b) in &variants {
            let cases = verify::standard_cases()
                .into_iter()
                .chain(verify::long_attention_cases());
            for (i, case) in cases.enumerate() {
                let mut c = verify::compare_case(b, &case, storage, 1000 + i as u64)?;
                c.case.push_str(suffix);
                rows.push(row("reference", c, op_tol));
            }
            rows.extend(random_rows(b, suffix, self.precision, op_tol)?);
        }
        let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
        let audio = ProjectorConfig::preset(Modality::Audio, Variant::Legacy);
        for (config, batch) in [(&image, 1), (&image, 3), (&audio, 2)] {
            let c = verify::compare_projector(&be, config, batch, storage, 7)?;
            rows.push(row("reference", c, model_tol));
        }
        let shapes = verify::random_projectors(57, RANDOM_PROJECTORS);
        let eps = self.precision.epsilon();
        let (mut c, bound) = verify::worst_projector(&be, &shapes, storage, 5700, model_tol, eps)
            .map_err(Error::invalid)?;
        c.case = format!("worst of {} random shapes: {}", shapes.len(), c.case);
        rows.push(row("reference", c, bound));
        // Bitwise, so a failure is a NaN row that names what differed.
        let threads = verify::check_threads(&be, &[1, 2, 3], 9);
        let mut case = "3 threads at once, each a plan for 3 inputs".to_string();
        if let Err(e) = &threads {
            case = format!("{case}: {e}");
        }
        rows.push(CheckRow {
            against: "one thread",
            op: "projector",
            case,
            rel: if threads.is_ok() { 0.0 } else { f64::NAN },
            max_abs: 0.0,
            tol: 0.0,
        });
        Ok(rows)
    }

    #[cfg(feature = "cuda")]
    fn run_cuda(self, be: Cuda) -> Result<Vec<CheckRow>> {
        let precision = self.precision;
        let mut rows = self.run(be.clone(), DeviceKind::Cuda)?;
        let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
        for batch in [1, 3] {
            let c = verify::compare_projector_by(
                &be,
                &image,
                batch,
                precision.storage(),
                7,
                "projector graph",
                |p, h, e| {
                    let (mut graph, x) = capture_for(&be, p, h, e)?;
                    graph.forward(&x)?;
                    // Two replays: the second must not depend on the first.
                    let first = be.download(graph.output())?;
                    let again = be.download(graph.forward(&x)?)?;
                    if first.to_f64_vec() != again.to_f64_vec() {
                        return Err(Error::invalid("two replays of one graph differ"));
                    }
                    Ok(again)
                },
            )?;
            rows.push(check_row("reference", c, precision.tolerances().1));
        }
        for f in launch_features(&be) {
            rows.push(against_plain(&be, &image, precision, &f)?);
        }
        rows.extend(large_tile_rows(&be, precision)?);
        Ok(rows)
    }
}

/// A GEMM with a 128x128 tile for every SM of `be`'s device (ragged in M and
/// K), on the kernel that takes such grids, and for 16-bit storage also on
/// the WMMA kernel `wmma_large_tiles` keeps; and for 16-bit storage a GEMM
/// of 512 columns whose square tiles would leave a few SMs two, on v5's
/// narrow tiles and on its square ones, and with the LayerNorm after it: the
/// standard cases are too small for them, and batch 64's forward is only
/// timed.
#[cfg(feature = "cuda")]
fn large_tile_rows(be: &Cuda, precision: Precision) -> Result<Vec<CheckRow>> {
    let sms = be.sm_count() as usize;
    let k = 200;
    let square = (128 * (sms.div_ceil(12).max(2) - 1) + 5, 128 * 12);
    let narrow = (128 * sms.div_ceil(4) + 5, 512);
    let with = |set| be.with_options(options_with(be.options(), set));
    // v6 on v5 (mma.sync), which it replaces, and v6's serial K loop, where
    // `be` takes v6.
    let (mma_sync, serial) = if be.warpgroup_mma() {
        (
            Some(with(|o| o.mma_sync_tiles = true)?),
            Some(with(|o| o.wgmma_serial_steps = true)?),
        )
    } else {
        (None, None)
    };
    let mut runs = vec![(be.clone(), square)];
    if precision.storage().size() == 2 {
        runs.extend([
            (with(|o| o.wmma_large_tiles = true)?, square),
            (be.clone(), narrow),
            (with(|o| o.square_mma_tiles = true)?, narrow),
        ]);
    }
    for b in mma_sync.iter().chain(&serial) {
        runs.extend([(b.clone(), square), (b.clone(), narrow)]);
    }
    let mut rows = Vec::new();
    for (b, (m, n)) in runs {
        let case = verify::Case::Linear {
            m,
            n,
            k,
            act: output_projector::ops::Activation::Relu,
            bias: true,
            residual: true,
        };
        let mut c = verify::compare_case(&b, &case, precision.storage(), 77)?;
        c.case = format!("{} {}", c.case, b.linear_kernel(m, n, k)?);
        rows.push(check_row("reference", c, precision.tolerances().0));
    }
    // The narrow GEMM with the LayerNorm after it: one kernel in 16-bit
    // where the device launches clusters (batch 64's decoder).
    let (m, n) = narrow;
    let case = verify::Case::LinearLayerNorm {
        m,
        n,
        k,
        act: output_projector::ops::Activation::None,
        residual: true,
        offset: 3.0,
    };
    for b in std::iter::once(be).chain(&mma_sync) {
        let mut c = verify::compare_case(b, &case, precision.storage(), 78)?;
        let how = b.linear_layer_norm_kernel(m, n, k).unwrap_or("two ops");
        c.case = format!("{} {how}", c.case);
        rows.push(check_row("reference", c, precision.tolerances().0));
    }
    Ok(rows)
}

/// `p`'s forward captured into a graph for the shape of `hidden`, and its
/// input: `hidden + embeds`, every token gathered.
#[cfg(feature = "cuda")]
fn capture_for<'p>(
    be: &Cuda,
    p: &'p Projector<Cuda>,
    hidden: &CudaTensor,
    embeds: &CudaTensor,
) -> Result<(ProjectorGraph<'p>, CudaTensor)> {
    let [batch, n_in] = [hidden.shape()[0], hidden.shape()[1]];
    let mut x = be.alloc(hidden.shape())?;
    let all = SignalPositions::all(batch, n_in)?;
    be.gather_signal_tokens(hidden, Some(embeds), &all, &mut x)?;
    Ok((p.capture(batch, n_in)?, x))
}

/// A way of running the forward that `be` uses and that options can turn
/// off, for `check` and `bench` to set against the plain forward.
#[cfg(feature = "cuda")]
struct LaunchFeature {
    /// Its `check` row's op, and what that row compares against.
    op: &'static str,
    against: &'static str,
    /// `bench`'s graph row with the feature off.
    graph_row: &'static str,
    /// `be`'s options with the feature off (that graph row's).
    off: CudaOptions,
    /// `check`'s two sides: the feature on and off, all else alike.
    check: [CudaOptions; 2],
    /// Whether the two must agree bitwise (else within the forward's
    /// tolerance against the reference).
    exact: bool,
}

/// `base` with one change made by `set`: a baseline or a feature turned off.
#[cfg(feature = "cuda")]
fn options_with(base: &CudaOptions, set: fn(&mut CudaOptions)) -> CudaOptions {
    let mut o = base.clone();
    set(&mut o);
    o
}

/// The features `be` uses: programmatic dependent launch, split-K in a
/// thread-block cluster, LayerNorms and attention folded into the linears
/// after them, warpgroup MMA, the absorbed cross-attention, attention over
/// keys split among warps.
#[cfg(feature = "cuda")]
fn launch_features(be: &Cuda) -> Vec<LaunchFeature> {
    let base = be.options().clone();
    let with = |set| options_with(&base, set);
    let mut features = Vec::new();
    if be.dependent_launch() {
        let off = with(|o| o.serial_launches = true);
        features.push(LaunchFeature {
            op: "dependent launch",
            against: "serial",
            graph_row: "projector graph serial",
            check: [base.clone(), off.clone()],
            off,
            exact: true,
        });
    }
    if be.cluster_split_k() {
        // Through memory the decoder's norms cannot fold into their split
        // GEMMs: the check compares both ways with every norm apart. The
        // same slices give the same sums: v2's (f32) splits are the same both
        // ways, but the tensor-core kernels' finishing block takes at most 4
        // slices where a cluster takes 8, so in 16-bit and TF32 the splits,
        // and the sums' order, differ.
        let apart = with(|o| o.separate_layer_norms = true);
        let mut memory_apart = apart.clone();
        memory_apart.split_k_through_memory = true;
        features.push(LaunchFeature {
            op: "cluster split-K",
            against: "memory",
            graph_row: "projector graph split-K in memory",
            off: with(|o| o.split_k_through_memory = true),
            check: [apart, memory_apart],
            exact: be.storage() == DType::F32 && !base.tf32,
        });
    }
    let apart = with(|o| o.separate_layer_norms = true);
    features.push(LaunchFeature {
        op: "folded layer_norm",
        against: "apart",
        graph_row: "projector graph layer_norms apart",
        check: [base.clone(), apart.clone()],
        off: apart,
        exact: false,
    });
    // Folded or not, the attention over few keys runs the same code on the
    // same lanes: bitwise the same.
    let apart = with(|o| o.separate_attention = true);
    features.push(LaunchFeature {
        op: "folded attention",
        against: "apart",
        graph_row: "projector graph attention apart",
        check: [base.clone(), apart.clone()],
        off: apart,
        exact: true,
    });
    // The tensor cores may add a step's products in another order under
    // wgmma than under mma.sync: the same result to rounding.
    if be.warpgroup_mma() {
        let mma_sync = with(|o| o.mma_sync_tiles = true);
        features.push(LaunchFeature {
            op: "warpgroup MMA",
            against: "mma.sync",
            graph_row: "projector graph mma.sync",
            check: [base.clone(), mma_sync.clone()],
            off: mma_sync,
            exact: false,
        });
    }
    // The absorbed cross-attention adds its products in another order: the
    // same result to rounding.
    let literal = with(|o| o.literal_cross_attention = true);
    features.push(LaunchFeature {
        op: "absorbed cross-attention",
        against: "literal",
        graph_row: "projector graph literal cross-attention",
        check: [base.clone(), literal.clone()],
        off: literal,
        exact: false,
    });
    // Split keys combine their parts' softmax states: the same result to
    // rounding.
    let query_blocks = with(|o| o.query_block_attention = true);
    features.push(LaunchFeature {
        op: "split-keys attention",
        against: "q-blocks",
        graph_row: "projector graph query-block attention",
        check: [base.clone(), query_blocks.clone()],
        off: query_blocks,
        exact: false,
    });
    features
}

/// The forward replayed from a graph with a feature on against the eager
/// forward with it off. The kernels are deterministic, so, for programmatic
/// dependent launch, a kernel reading before its predecessor finished shows
/// as a difference; for split-K in a cluster (f32), a slice added out of
/// order or missed. Where the sums' order differs (folded LayerNorms, split-K
/// on tensor cores): within the forward's tolerance.
#[cfg(feature = "cuda")]
fn against_plain(
    be: &Cuda,
    config: &ProjectorConfig,
    precision: Precision,
    feature: &LaunchFeature,
) -> Result<CheckRow> {
    let case = verify::ProjectorCase::new(config, 2, precision.storage(), 11)?;
    let on_be = be.with_options(feature.check[0].clone())?;
    let featured = case.run(&on_be, |p, h, e| {
        let (mut graph, x) = capture_for(&on_be, p, h, e)?;
        on_be.download(graph.forward(&x)?)
    })?;
    let plain_be = be.with_options(feature.check[1].clone())?;
    let plain = case.run(&plain_be, |p, h, e| {
        plain_be.download(&p.forward(h, Some(e))?)
    })?;
    let (a, b) = (featured.to_f64_vec(), plain.to_f64_vec());
    let (rel, max_abs) = output_projector::tensor::compare(&a, &b);
    let differing = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    Ok(CheckRow {
        against: feature.against,
        op: feature.op,
        case: format!("{} ({differing} elements differ)", case.name),
        rel: if differing == 0 && a.len() == b.len() {
            0.0
        } else {
            rel.max(f64::MIN_POSITIVE)
        },
        max_abs,
        tol: if feature.exact {
            0.0
        } else {
            precision.tolerances().1
        },
    })
}

fn check(device: Option<String>, precision: Precision) -> Result<ExitCode> {
    let mut failures = 0;
    let kinds = backends(device, precision)?;
    println!(
        "{:<6} {:<8} {:<22} {:<42} {:>10} {:>10} {:>7}  result",
        "device", "against", "op", "case", "rel err", "max abs", "tol"
    );
    for kind in kinds {
        for r in device::run_on_with(kind, precision, Check { precision })? {
            let ok = r.rel <= r.tol;
            failures += usize::from(!ok);
            println!(
                "{:<6} {:<8} {:<22} {:<42} {:>10.2e} {:>10.2e} {:>7.1e}  {}",
                kind.name(),
                r.against,
                r.op,
                r.case,
                r.rel,
                r.max_abs,
                r.tol,
                if ok { "ok" } else { "FAIL" }
            );
        }
    }
    if failures > 0 {
        println!("{failures} failed");
        return Ok(ExitCode::FAILURE);
    }
    println!("all passed");
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct BenchRow {
    device: String,
    precision: String,
    what: String,
    shape: String,
    median_us: f64,
    min_us: f64,
    /// Median host time: until the call issuing a run returned (bench::Timing).
    host_us: f64,
    /// Median device time from timestamp queries, where the backend has them.
    device_us: Option<f64>,
    /// Device time per run of a burst of runs queued back to back (no host
    /// round trip between them), where the backend has timestamp queries.
    burst_us: Option<f64>,
    runs: usize,
    /// Rates over the device time where measured, else over the wall time.
    gflops: f64,
    gbytes_per_s: f64,
    /// Kernels one run launches (a graph replay: the kernels in the graph).
    launches: Option<u64>,
    /// Inputs a forward row (bench::FORWARD_INPUTS) or argument sets an op
    /// row (bench::Rotation) rotated over, run by run.
    buffers: Option<usize>,
}

/// Most runs per burst, and bursts, of `bench`'s back-to-back device timing
/// (at most about as long again as the single-run timing).
const BURST_RUNS: usize = 20;
const BURSTS: usize = 5;

#[derive(Clone, Copy)]
struct Bench<'a> {
    modality: Modality,
    batches: &'a [usize],
    budget: Duration,
    precision: Precision,
    /// The device cache an op row's argument sets together exceed twice over
    /// (bench::Rotation), in bytes; 0 where its size is unknown (one set).
    cache_bytes: usize,
}

impl Bench<'_> {
    fn config(&self) -> ProjectorConfig {
        ProjectorConfig::preset(self.modality, Variant::Legacy)
    }

    fn weights(&self) -> Result<ProjectorWeights> {
        ProjectorWeights::random(self.config(), Some(self.modality), 0)
    }

    fn n_in(&self) -> usize {
        self.config().n_in.unwrap_or(4)
    }

    /// [`bench::FORWARD_INPUTS`] inputs of `batch` rows, each its own draw,
    /// for a forward row to rotate over as PyTorch's side does (drawn once
    /// per batch, uploaded to each backend by [`upload_inputs`]).
    fn inputs(&self, batch: usize) -> Result<Vec<HostTensor>> {
        let shape = vec![batch, self.n_in(), self.config().in_dim];
        (1..=bench::FORWARD_INPUTS as u64)
            .map(|seed| HostTensor::randn(shape.clone(), seed, "--batch"))
            .collect()
    }

    /// Bytes per element as the backend stores it (the reference holds f64).
    fn elem(&self, kind: DeviceKind) -> usize {
        if kind == DeviceKind::Reference {
            8
        } else {
            self.precision.storage().size()
        }
    }

    /// `f` timed run by run, then in bursts (µs per run, where measured).
    fn measure<B: Backend>(
        &self,
        be: &B,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<(bench::Timing, Option<f64>)> {
        let t = bench::time(be, 3, self.budget, &mut f)?;
        let burst = bench::time_burst(be, &t, self.budget, BURST_RUNS, BURSTS, f)?;
        Ok((t, burst.map(|d| d.as_secs_f64() * 1e6)))
    }

    /// A projector row: `what` at `batch`, timed as `t`.
    fn projector_row(
        &self,
        kind: DeviceKind,
        what: &str,
        batch: usize,
        t: &bench::Timing,
        launches: Option<u64>,
    ) -> Result<BenchRow> {
        let c = self.config();
        let flops = OpCase::forward_flops(&c, batch, self.n_in());
        let weight_bytes = (c.parameter_count()? * self.elem(kind)) as f64;
        let shape = format!("{} batch {batch}", self.modality.name());
        let mut r = row(kind, self.precision, what, shape, t, flops, weight_bytes);
        r.launches = launches;
        Ok(r)
    }
}

#[cfg(feature = "cuda")]
impl Bench<'_> {
    /// `batch`'s GEMMs and attentions again on the kernels they would take
    /// under other options, where those differ, as rows after that batch's
    /// op rows: v6 (warpgroup MMA) on v5's mma.sync (`linear mma.sync`) and
    /// with its MMAs drained between K steps (`linear wgmma serial`), the
    /// large tiles on v3's WMMA ones (`linear wmma`), 128x64 tiles on
    /// 128x128 ones (`linear square`), and v5's split keys on the
    /// query-block kernels (`attention q-blocks`).
    fn baseline_rows(&self, be: &Cuda, batch: usize) -> Result<Vec<BenchRow>> {
        let with = |set| options_with(be.options(), set);
        let baselines = [
            ("mma.sync", with(|o| o.mma_sync_tiles = true)),
            ("wgmma serial", with(|o| o.wgmma_serial_steps = true)),
            ("wmma", with(|o| o.wmma_large_tiles = true)),
            ("square", with(|o| o.square_mma_tiles = true)),
            ("q-blocks", with(|o| o.query_block_attention = true)),
        ];
        // The kernel a case takes on a backend; None for other ops.
        let kernel = |b: &Cuda, case: &OpCase| -> Result<Option<&'static str>> {
            Ok(match *case {
                OpCase::Linear { m, n, k, .. } => Some(b.linear_kernel(m, n, k)?),
                OpCase::Attention {
                    batch,
                    lq,
                    lk,
                    heads,
                    head_dim,
                } => Some(b.attention_kernel(batch, lq, lk, heads, head_dim)?),
                _ => None,
            })
        };
        let config = self.config();
        let elem = self.elem(DeviceKind::Cuda);
        let mut rows = Vec::new();
        for (label, options) in baselines {
            let other = be.with_options(options)?;
            for case in OpCase::projector_ops(&config, batch, self.n_in())? {
                let theirs = kernel(&other, &case)?;
                if theirs.is_none() || theirs == kernel(be, &case)? {
                    continue;
                }
                let mut p = Rotation::new(&case, &other, 2, self.cache_bytes, elem)?;
                let (t, burst) = self.measure(&other, || p.run(&other))?;
                let what = format!("{} {label}", case.op());
                let (flops, bytes) = (case.flops(), case.bytes(elem));
                let mut r = row(
                    DeviceKind::Cuda,
                    self.precision,
                    &what,
                    case.shape(),
                    &t,
                    flops,
                    bytes,
                );
                r.burst_us = burst;
                r.buffers = Some(p.count());
                rows.push(r);
            }
        }
        Ok(rows)
    }
}

/// `inputs` on `be`, to be taken in turn.
fn upload_inputs<B: Backend>(be: &B, inputs: &[HostTensor]) -> Result<bench::Cycle<B::Tensor>> {
    let on_be = inputs.iter().map(|h| be.upload(h)).collect::<Result<_>>()?;
    bench::Cycle::new(on_be, "forward inputs")
}

impl BackendTask for Bench<'_> {
    type Output = Vec<BenchRow>;

    /// Each measurement on the fast kernels is followed at once by the same one
    /// on the naive v1 kernels (where the backend has them), so that both see the
    /// same machine load.
    fn run<B>(self, be: B, kind: DeviceKind) -> Result<Vec<BenchRow>>
    where
        B: Backend + Send + Sync,
        B::Tensor: Send + Sync,
        B::Mask: Send + Sync,
    {
        let mut variants = vec![("", be.clone())];
        if let Some(naive) = be.naive()? {
            variants.push((" v1", naive));
        }
        let config = self.config();
        let w = self.weights()?;
        let n_in = self.n_in();
        let elem = self.elem(kind);
        let mut rows = Vec::new();
        for &batch in self.batches {
            let hidden = self.inputs(batch)?;
            for (suffix, b) in &variants {
                let proj = Projector::new(b.clone(), &w)?;
                let mut inputs = upload_inputs(b, &hidden)?;
                let mut plan = proj.plan(batch, n_in)?;
                let before = b.kernel_launches();
                proj.forward_with(&mut plan, inputs.next_mut(), None)?;
                let launches = b.kernel_launches().zip(before).map(|(a, z)| a - z);
                let (t, burst) = self.measure(b, || {
                    proj.forward_with(&mut plan, inputs.next_mut(), None)
                        .map(|_| ())
                })?;
                let what = format!("projector{suffix}");
                let mut r = self.projector_row(kind, &what, batch, &t, launches)?;
                r.burst_us = burst;
                r.buffers = Some(inputs.count());
                rows.push(r);
            }
            for case in OpCase::projector_ops(&config, batch, n_in)? {
                for (suffix, b) in &variants {
                    let mut p = Rotation::new(&case, b, 2, self.cache_bytes, elem)?;
                    let (t, burst) = self.measure(b, || p.run(b))?;
                    let what = format!("{}{suffix}", case.op());
                    let (flops, bytes) = (case.flops(), case.bytes(elem));
                    let shape = case.shape();
                    let mut r = row(kind, self.precision, &what, shape, &t, flops, bytes);
                    r.burst_us = burst;
                    r.buffers = Some(p.count());
                    rows.push(r);
                }
            }
        }
        Ok(rows)
    }

    /// The rows of every backend batch by batch, each batch's followed by
    /// its `linear wmma` and `linear square` rows (16-bit GEMMs that take v5
    /// timed on v3's large tiles, and those on v5's narrow tiles on its
    /// square ones), then the forward replayed from a CUDA graph;
    /// where kernels are queued with programmatic dependent launch, the graph
    /// again with serial launches, and where split GEMMs add their slices in
    /// a cluster, again through memory, so the table shows what each gains.
    /// Op rows rotate over argument sets that together exceed twice the L2;
    /// forward rows over 8 inputs, which a graph row copies into its input
    /// buffer before each replay (`ProjectorGraph::forward`, as
    /// `torch.compile`'s CUDA graphs copy theirs).
    #[cfg(feature = "cuda")]
    fn run_cuda(self, be: Cuda) -> Result<Vec<BenchRow>> {
        let this = Bench {
            cache_bytes: be.l2_bytes(),
            ..self
        };
        let mut rows = Vec::new();
        for batch in this.batches {
            let one = Bench {
                batches: std::slice::from_ref(batch),
                ..this
            };
            rows.extend(one.run(be.clone(), DeviceKind::Cuda)?);
            rows.extend(this.baseline_rows(&be, *batch)?);
        }
        let weights = this.weights()?;
        let mut backends = vec![("projector graph", be.clone())];
        for f in launch_features(&be) {
            backends.push((f.graph_row, be.with_options(f.off)?));
        }
        let hidden = this
            .batches
            .iter()
            .map(|&batch| this.inputs(batch))
            .collect::<Result<Vec<_>>>()?;
        for (what, be) in backends {
            let proj = Projector::new(be.clone(), &weights)?;
            for (&batch, hidden) in this.batches.iter().zip(&hidden) {
                let mut inputs = upload_inputs(&be, hidden)?;
                let mut graph = proj.capture(batch, this.n_in())?;
                graph.forward(inputs.next_mut())?;
                let (t, burst) =
                    this.measure(&be, || graph.forward(inputs.next_mut()).map(|_| ()))?;
                let launches = Some(graph.kernels());
                let mut r = this.projector_row(DeviceKind::Cuda, what, batch, &t, launches)?;
                r.burst_us = burst;
                r.buffers = Some(inputs.count());
                rows.push(r);
            }
        }
        Ok(rows)
    }
}

fn row(
    kind: DeviceKind,
    precision: Precision,
    what: &str,
    shape: String,
    t: &bench::Timing,
    flops: f64,
    bytes: f64,
) -> BenchRow {
    let device = t.device_median.map(|d| d.as_secs_f64());
    let s = device.unwrap_or(t.median.as_secs_f64());
    BenchRow {
        device: kind.name().into(),
        precision: if kind == DeviceKind::Reference {
            "f64"
        } else {
            precision.name()
        }
        .into(),
        what: what.into(),
        shape,
        median_us: t.median.as_secs_f64() * 1e6,
        min_us: t.min.as_secs_f64() * 1e6,
        host_us: t.host_median.as_secs_f64() * 1e6,
        device_us: device.map(|d| d * 1e6),
        burst_us: None,
        runs: t.runs,
        gflops: flops / s / 1e9,
        gbytes_per_s: bytes / s / 1e9,
        launches: None,
        buffers: None,
    }
}

fn bench(
    device: Option<String>,
    modality: &str,
    batch: &str,
    seconds: f64,
    json: bool,
    precision: Precision,
) -> Result<ExitCode> {
    let modality = Modality::parse(modality)?;
    let batches = batch
        .split(',')
        .map(|b| match b.trim().parse::<usize>() {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(Error::invalid(format!(
                "--batch: `{b}` is not a batch size >= 1"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(Error::invalid(format!("--seconds {seconds} must be > 0")));
    }
    let budget = Duration::from_secs_f64(seconds.min(600.0));
    let mut rows = Vec::new();
    for kind in backends(device, precision)? {
        let task = Bench {
            modality,
            batches: &batches,
            budget,
            precision,
            cache_bytes: 0,
        };
        rows.extend(device::run_on_with(kind, precision, task)?);
    }
    if json {
        let text =
            serde_json::to_string_pretty(&rows).map_err(|e| Error::invalid(e.to_string()))?;
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<6} {:<5} {:<24} {:<34} {:>12} {:>12} {:>10} {:>12} {:>10} {:>6} {:>5} {:>9} {:>9} {:>8}",
        "device",
        "prec",
        "what",
        "shape",
        "median us",
        "min us",
        "host us",
        "device us",
        "burst us",
        "runs",
        "sets",
        "GFLOP/s",
        "GB/s",
        "kernels"
    );
    for r in rows {
        let device_us = r.device_us.map_or("-".to_string(), |d| format!("{d:.1}"));
        let burst_us = r.burst_us.map_or("-".to_string(), |d| format!("{d:.1}"));
        let launches = r.launches.map_or("-".to_string(), |n| n.to_string());
        let sets = r.buffers.map_or("-".to_string(), |n| n.to_string());
        println!(
            "{:<6} {:<5} {:<24} {:<34} {:>12.1} {:>12.1} {:>10.1} {:>12} {:>10} {:>6} {:>5} {:>9.2} {:>9.2} {:>8}",
            r.device,
            r.precision,
            r.what,
            r.shape,
            r.median_us,
            r.min_us,
            r.host_us,
            device_us,
            burst_us,
            r.runs,
            sets,
            r.gflops,
            r.gbytes_per_s,
            launches
        );
    }
    println!(
        "(host us: until the call issuing a run returned (recording or launching; all of a \
         run on the CPU); device us: timestamp queries or CUDA events where offered, around one run; burst us: \
         the same per run of up to {BURST_RUNS} runs queued back to back (- where two do not \
         fit the time budget); sets: inputs a forward row, or argument sets an op row, rotates \
         over run by run (an op's together over twice the GPU's L2 where its size is known; 1: \
         one set, cache warm); rates use device us when present; kernels: launches per forward)"
    );
    Ok(ExitCode::SUCCESS)
}

fn kernels(
    arch: &str,
    cubin_dir: Option<&std::path::Path>,
    kernel_cache: Option<Option<PathBuf>>,
) -> Result<ExitCode> {
    let number = arch
        .strip_prefix("sm_")
        .map(|n| n.strip_suffix('a').unwrap_or(n));
    if arch != "native" && number.is_none_or(|n| n.parse::<u32>().is_err()) {
        return Err(Error::invalid(format!(
            "--arch `{arch}`: expected sm_XX or sm_XXa, e.g. sm_80 or sm_90a, or native"
        )));
    }
    kernel_table(arch, cubin_dir, kernel_cache)
}

/// ptxas's report of every kernel compiled for `arch` (needs NVRTC, not a GPU).
#[cfg(feature = "cuda")]
fn kernel_table(
    arch: &str,
    cubin_dir: Option<&std::path::Path>,
    kernel_cache: Option<Option<PathBuf>>,
) -> Result<ExitCode> {
    use output_projector::cuda::KernelCache;
    let arch = match arch {
        "native" => {
            let devices = output_projector::cuda::probe_devices()?;
            devices
                .first()
                .map(|d| d.arch())
                .ok_or_else(|| Error::invalid("--arch native: no CUDA device"))?
        }
        _ => arch.to_string(),
    };
    let arch = arch.as_str();
    let kernel_cache = match kernel_cache {
        Some(None) => Some(
            KernelCache::FromEnv
                .folder()
                .or_else(KernelCache::default_folder)
                .ok_or_else(|| {
                    Error::invalid(
                        "--kernel-cache without a folder: OUTPROJ_KERNEL_CACHE, \
                         XDG_CACHE_HOME and HOME name none",
                    )
                })?,
        ),
        other => other.flatten(),
    };
    let kernel_cache = kernel_cache.as_deref();
    // The folders first: a bad path is known before minutes of compiling.
    for (flag, dir) in [("--cubin-dir", cubin_dir), ("--kernel-cache", kernel_cache)] {
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::invalid(format!("{flag} {}: {e}", dir.display())))?;
        }
    }
    let reports = output_projector::cuda::program_reports(arch)?;
    for p in &reports {
        if let Some(dir) = cubin_dir {
            let stem = p.file.trim_end_matches(".cu");
            let path = dir.join(format!("{stem}-{}-{arch}.cubin", p.storage.name()));
            std::fs::write(&path, &p.cubin)
                .map_err(|e| Error::invalid(format!("writing {}: {e}", path.display())))?;
        }
        if let Some(dir) = kernel_cache {
            p.store_in_cache(dir)?;
        }
    }
    println!(
        "{:<24} {:<7} {:<36} {:>9} {:>9} {:>8} {:>14}",
        "file", "storage", "kernel", "registers", "smem B", "stack B", "spill st/ld B"
    );
    let (mut count, mut spilling) = (0, 0);
    for p in &reports {
        for k in &p.kernels {
            count += 1;
            spilling += usize::from(k.spill_stores + k.spill_loads > 0);
            println!(
                "{:<24} {:<7} {:<36} {:>9} {:>9} {:>8} {:>14}",
                p.file,
                p.storage.name(),
                k.name,
                k.registers,
                k.shared_bytes,
                k.stack_bytes,
                format!("{}/{}", k.spill_stores, k.spill_loads)
            );
        }
    }
    for p in &reports {
        for w in &p.warnings {
            println!("{} ({}): {w}", p.file, p.storage.name());
        }
    }
    println!(
        "{count} kernels in {} compiles (files x f32/f16/bf16 storage) for {arch}; {}",
        reports.len(),
        if spilling == 0 {
            "none spills".to_string()
        } else {
            format!("{spilling} spill registers")
        }
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "cuda"))]
fn kernel_table(
    _arch: &str,
    _cubin_dir: Option<&std::path::Path>,
    _kernel_cache: Option<Option<PathBuf>>,
) -> Result<ExitCode> {
    Err(Error::Unavailable {
        backend: "cuda".into(),
        reason: "built without the `cuda` cargo feature".into(),
    })
}
