//! Bad input never panics: every malformed file, argument or value given to the
//! `outproj` binary ends in exactly one line on stderr that names what was wrong,
//! and a non-zero exit status that is not Rust's panic code (101), nor the code of a
//! caught internal error (70), nor death by a signal (an aborted allocation).
//!
//! The files are written into a fresh directory under the system temp dir: small
//! custom projectors (in_dim 16, d_model 8) keep every run fast; one test builds the
//! full-size audio preset once to check n_in against a preset.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use output_projector::config::{Modality, ProjectorConfig, Variant};
use output_projector::tensor::{DType, HostTensor};
use output_projector::weights::{self, ProjectorWeights, TensorFile};

// ---------------------------------------------------------------------------
// Scaffolding
// ---------------------------------------------------------------------------

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "outproj-cli-errors-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn outproj<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_outproj"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("start outproj")
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A clean failure: non-zero exit code (not a signal, not 101, not 70), exactly
/// one non-empty line on stderr, no panic text, and every word of `words` in it
/// (case-insensitive).
#[track_caller]
fn expect_error(out: &Output, words: &[&str]) -> String {
    let all = describe(out);
    let code = out.status.code();
    assert!(
        code.is_some(),
        "killed by a signal (an abort?), not a clean error:\n{all}"
    );
    assert_ne!(
        code,
        Some(0),
        "succeeded, but an error was expected:\n{all}"
    );
    assert_ne!(
        code,
        Some(101),
        "exit status 101 is Rust's panic code:\n{all}"
    );
    assert_ne!(
        code,
        Some(70),
        "exit status 70 is a caught internal error (a panic):\n{all}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr must be exactly one line:\n{all}");
    let line = lines[0];
    assert!(!line.trim().is_empty(), "stderr line is empty:\n{all}");
    let lower = line.to_lowercase();
    for bad in ["panicked", "internal error", "backtrace"] {
        assert!(!lower.contains(bad), "stderr mentions `{bad}`:\n{all}");
    }
    for w in words {
        assert!(
            lower.contains(&w.to_lowercase()),
            "stderr does not name `{w}`:\n{all}"
        );
    }
    line.to_string()
}

#[track_caller]
fn expect_success(out: &Output) {
    assert!(out.status.success(), "expected success:\n{}", describe(out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        describe(out)
    );
}

/// Either a success (a backend that works here) or a clean error naming `words`.
#[track_caller]
fn expect_success_or_error(out: &Output, words: &[&str]) {
    if !out.status.success() {
        expect_error(out, words);
    }
}

/// Whether the environment variable `var` is `1` (`REQUIRE_WGPU`: CI has a wgpu
/// adapter, and a missing or failing one is a failure, not a skip).
fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

fn small_config() -> ProjectorConfig {
    ProjectorConfig {
        variant: Variant::Legacy,
        in_dim: 16,
        d_model: 8,
        heads: 2,
        ffn_dim: 16,
        encoder_layers: 1,
        decoder_layers: 1,
        n_out: 3,
        out_dim: 5,
        n_in: None,
        eps: 1e-5,
    }
}

fn small_weights(seed: u64) -> ProjectorWeights {
    ProjectorWeights::random(small_config(), None, seed).expect("small random weights")
}

/// The small projector saved under `prefix`; its path.
fn write_small(s: &Scratch, file: &str, prefix: &str) -> PathBuf {
    let p = s.path(file);
    small_weights(1).save(&p, prefix).expect("save weights");
    p
}

/// A deterministic f32 tensor of `shape` with values in (-1, 1).
fn tensor(shape: &[usize], seed: u32) -> HostTensor {
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2000) as f32 / 1000.0 - 1.0
        })
        .collect();
    HostTensor::from_f32(shape.to_vec(), data).expect("tensor")
}

fn write_tensors(path: &Path, tensors: Vec<(&str, HostTensor)>) {
    let map: BTreeMap<String, HostTensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    weights::save(path, &map, None).expect("save tensors");
}

/// An input file with `hidden` (and `embeds` when given).
fn write_input(s: &Scratch, file: &str, hidden: HostTensor, embeds: Option<HostTensor>) -> PathBuf {
    let p = s.path(file);
    let mut t = vec![("hidden", hidden)];
    if let Some(e) = embeds {
        t.push(("embeds", e));
    }
    write_tensors(&p, t);
    p
}

/// A valid input for the small projector: hidden and embeds [2, 3, 16].
fn small_input(s: &Scratch) -> PathBuf {
    write_input(
        s,
        "input.safetensors",
        tensor(&[2, 3, 16], 1),
        Some(tensor(&[2, 3, 16], 2)),
    )
}

/// Raw safetensors bytes: 8-byte little-endian header length, header, data.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// One entry of a hand-written safetensors file.
struct RawTensor {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn raw_tensor(name: &str, dtype: &'static str, shape: &[usize], bytes: Vec<u8>) -> RawTensor {
    RawTensor {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        bytes,
    }
}

fn from_host(name: &str, t: &HostTensor) -> RawTensor {
    let dtype = match t.dtype() {
        DType::F64 => "F64",
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
    };
    raw_tensor(name, dtype, t.shape(), t.as_bytes().to_vec())
}

/// A well-formed safetensors file holding any dtype the format knows.
fn raw_file(tensors: &[RawTensor]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for t in tensors {
        let start = data.len();
        data.extend_from_slice(&t.bytes);
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [start, data.len()] }),
        );
    }
    raw(&serde_json::Value::Object(header).to_string(), &data)
}

/// The small projector's state dict as raw tensors, `edit` applied, written to `file`.
fn write_small_edited(s: &Scratch, file: &str, edit: impl FnOnce(&mut Vec<RawTensor>)) -> PathBuf {
    let mut ts: Vec<RawTensor> = small_weights(1)
        .state_dict("")
        .iter()
        .map(|(k, v)| from_host(k, v))
        .collect();
    edit(&mut ts);
    let p = s.path(file);
    std::fs::write(&p, raw_file(&ts)).expect("write");
    p
}

fn replace(ts: &mut [RawTensor], t: RawTensor) {
    let slot = ts
        .iter_mut()
        .find(|x| x.name == t.name)
        .expect("tensor to replace");
    *slot = t;
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `run` on the CPU with the given weights and input, plus `extra` arguments.
fn run_cpu(weights: &Path, input: &Path, extra: &[&str]) -> Output {
    run_device("cpu", weights, input, extra)
}

/// `run` on `device` with the given weights and input, plus `extra` arguments.
fn run_device(device: &str, weights: &Path, input: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = vec![
        "run".as_ref(),
        "--device".as_ref(),
        device.as_ref(),
        "--weights".as_ref(),
        weights.as_os_str(),
        "--input".as_ref(),
        input.as_os_str(),
    ];
    args.extend(extra.iter().map(|a| OsStr::new(*a)));
    outproj(args)
}

// ---------------------------------------------------------------------------
// Positive controls
// ---------------------------------------------------------------------------

/// Each CPU device writes its own precision by default: f64 from the
/// reference, f32 from the CPU backend, and they agree to f32's accuracy.
#[test]
fn small_model_runs_on_both_cpu_devices() {
    let s = Scratch::new("ok");
    let w = write_small(&s, "w.safetensors", "");
    let input = small_input(&s);
    let mut outputs = Vec::new();
    for (device, dtype) in [("reference", DType::F64), ("cpu", DType::F32)] {
        let out_path = s.path(&format!("out-{device}.safetensors"));
        let out = run_device(
            device,
            &w,
            &input,
            &["--output", out_path.to_str().unwrap()],
        );
        expect_success(&out);
        let f = TensorFile::open(&out_path).expect("output readable");
        let y = f.get("conditioning").expect("conditioning in output");
        assert_eq!(y.shape(), &[2, 3, 5]);
        assert_eq!(y.dtype(), dtype, "{device}");
        assert!(y.first_non_finite().is_none());
        outputs.push(y.to_f64_vec());
    }
    let (rel, _) = output_projector::tensor::compare(&outputs[1], &outputs[0]);
    assert!(rel <= 1e-5, "cpu vs reference: rel {rel:.2e}");
}

#[test]
fn small_model_runs_without_embeds_and_in_other_dtypes() {
    let s = Scratch::new("noembeds");
    let w = write_small(&s, "w.safetensors", "");
    let input = write_input(&s, "in.safetensors", tensor(&[1, 2, 16], 3), None);
    expect_success(&run_cpu(&w, &input, &[]));

    // f16 hidden with bf16 embeds, f16 output.
    let h = tensor(&[2, 4, 16], 4).to_dtype(DType::F16);
    let e = tensor(&[2, 4, 16], 5).to_dtype(DType::BF16);
    let input = write_input(&s, "in16.safetensors", h, Some(e));
    let out_path = s.path("out16.safetensors");
    expect_success(&run_cpu(
        &w,
        &input,
        &["--output", out_path.to_str().unwrap(), "--out-dtype", "f16"],
    ));
    let y = TensorFile::open(&out_path)
        .unwrap()
        .get("conditioning")
        .unwrap();
    assert_eq!((y.shape(), y.dtype()), (&[2usize, 3, 5][..], DType::F16));
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// NExT-GPT's checkpoint format (`torch.save` of its parameters) runs as its
/// safetensors twin does, to the same output; one PyTorch does not write any more is
/// one line naming the file and the way out.
#[test]
fn a_pytorch_checkpoint_runs_as_its_safetensors_twin() {
    let s = Scratch::new("torch");
    let input = golden("model_legacy_b1.io.safetensors");
    let mut outputs = Vec::new();
    for weights in ["torch_legacy_b1.pt", "model_legacy_b1.weights.safetensors"] {
        let out_path = s.path(&format!("{weights}.out.safetensors"));
        let out = run_cpu(
            &golden(weights),
            &input,
            &["--output", out_path.to_str().unwrap()],
        );
        expect_success(&out);
        let y = TensorFile::open(&out_path)
            .unwrap()
            .get("conditioning")
            .unwrap();
        outputs.push(y);
    }
    assert_eq!(outputs[0], outputs[1]);
    assert_eq!(outputs[0].shape(), &[1, 4, 32]);
    let legacy = golden("torch_legacy_format.pt");
    expect_error(
        &run_cpu(&legacy, &input, &[]),
        &["torch_legacy_format.pt", "legacy format", "PyTorch 1.6"],
    );
}

/// `info --weights` lists every projector of a checkpoint, says why one does not
/// load, and is an error when none does.
#[test]
fn info_lists_the_projectors_of_a_checkpoint() {
    let s = Scratch::new("info");
    let mut all = small_weights(1).state_dict("gen_text_hidden_fcs.0.");
    all.extend(small_weights(2).state_dict("gen_text_hidden_fcs_audio.0."));
    let broken = small_weights(3).state_dict("gen_text_hidden_fcs_video.0.");
    all.extend(broken.into_iter().filter(|(k, _)| !k.ends_with("fc.bias")));
    let path = s.path("three.safetensors");
    weights::save(&path, &all, None).unwrap();
    let heads = ["--heads", "2"];
    let out = outproj(
        ["info", "--weights", path.to_str().unwrap()]
            .iter()
            .chain(&heads),
    );
    expect_success(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].ends_with("three.safetensors: 3 projector(s)"),
        "{text}"
    );
    for (line, prefix) in lines[1..]
        .iter()
        .zip(["gen_text_hidden_fcs.0.", "gen_text_hidden_fcs_audio.0."])
    {
        assert!(line.trim_start().starts_with(prefix), "{text}");
        assert!(
            line.contains("legacy f32") && line.contains("[B, n_in, 16] -> [B, 3, 5]"),
            "{text}"
        );
    }
    assert!(
        lines[3].contains("gen_text_hidden_fcs_video.0.") && lines[3].contains("does not load"),
        "{text}"
    );
    assert!(lines[3].contains("fc.bias"), "{text}");

    let out = outproj([
        "info",
        "--weights",
        golden("torch_legacy_b1.pt").to_str().unwrap(),
    ]);
    expect_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("gen_text_hidden_fcs_video.0."));
    let none = golden("torch_mixed.pt");
    expect_error(
        &outproj(["info", "--weights", none.to_str().unwrap()]),
        &["torch_mixed.pt", "no projector"],
    );
}

#[test]
fn small_model_runs_with_explicit_prefix_and_random_input() {
    let s = Scratch::new("prefix");
    let w = write_small(&s, "w.safetensors", "gen_text_hidden_fcs.0.");
    let input = small_input(&s);
    expect_success(&run_cpu(
        &w,
        &input,
        &["--prefix", "gen_text_hidden_fcs.0."],
    ));
    // The prefix is also found without being named (one projector in the file).
    expect_success(&run_cpu(&w, &input, &[]));
    // No --input: seeded random hidden states for this checkpoint.
    let out = outproj([
        "run",
        "--device",
        "cpu",
        "--weights",
        w.to_str().unwrap(),
        "--batch",
        "2",
    ]);
    expect_success(&out);
}

/// Full LLM outputs for the small projector: hidden and embeds [2, 7, 16] and
/// `token_ids` [2, 7] (i64) holding the signal tokens 900, 901, 902 at
/// positions 1, 2, 5 and 0, 3, 4 (each sequence with a signal token once more
/// after the last, which the search must not take); `extra` tensors added (e.g. `signal_ids`).
fn write_llm_outputs(s: &Scratch, file: &str, token_ids: &[i64], extra: Vec<RawTensor>) -> PathBuf {
    let mut ts = vec![
        from_host("hidden", &tensor(&[2, 7, 16], 6)),
        from_host("embeds", &tensor(&[2, 7, 16], 7)),
        raw_tensor(
            "token_ids",
            "I64",
            &[2, token_ids.len() / 2],
            token_ids.iter().flat_map(|t| t.to_le_bytes()).collect(),
        ),
    ];
    ts.extend(extra);
    let p = s.path(file);
    std::fs::write(&p, raw_file(&ts)).expect("write");
    p
}

const LLM_TOKENS: [i64; 14] = [1, 900, 901, 7, 8, 902, 901, 900, 5, 6, 901, 902, 2, 900];
const LLM_POSITIONS: [[usize; 3]; 2] = [[1, 2, 5], [0, 3, 4]];

/// `signal_ids` [3] as an i32 tensor.
fn signal_ids_tensor(ids: &[i32]) -> RawTensor {
    raw_tensor(
        "signal_ids",
        "I32",
        &[ids.len()],
        ids.iter().flat_map(|t| t.to_le_bytes()).collect(),
    )
}

/// `run --input` with whole sequences and their token ids finds the signal
/// tokens and projects exactly what the gathered input projects: the same
/// f64 output, with the ids from the file or from --signal-ids.
#[test]
fn run_finds_signal_tokens_in_llm_outputs() {
    let s = Scratch::new("llm");
    let w = write_small(&s, "w.safetensors", "");
    let gather = |seed| {
        let full = tensor(&[2, 7, 16], seed).to_f64_vec();
        let rows = LLM_POSITIONS
            .iter()
            .enumerate()
            .flat_map(|(b, ps)| ps.map(|p| (b * 7 + p) * 16))
            .flat_map(|r| full[r..r + 16].to_vec())
            .collect();
        HostTensor::from_f64(vec![2, 3, 16], rows)
            .unwrap()
            .to_dtype(DType::F32)
    };
    let gathered = write_input(&s, "gathered.safetensors", gather(6), Some(gather(7)));
    let conditioning = |input: &Path, extra: &[&str]| {
        let out_path = s.path("out.safetensors");
        let mut args = vec!["--output", out_path.to_str().unwrap()];
        args.extend(extra);
        let out = run_cpu(&w, input, &args);
        expect_success(&out);
        let y = TensorFile::open(&out_path)
            .unwrap()
            .get("conditioning")
            .unwrap();
        (y, String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (want, _) = conditioning(&gathered, &[]);
    assert_eq!(want.shape(), &[2, 3, 5]);

    let in_file = write_llm_outputs(
        &s,
        "llm.safetensors",
        &LLM_TOKENS,
        vec![signal_ids_tensor(&[900, 901, 902])],
    );
    let bare = write_llm_outputs(&s, "llm-bare.safetensors", &LLM_TOKENS, vec![]);
    for (input, extra) in [
        (&in_file, &[][..]),
        (&bare, &["--signal-ids", "900,901,902"][..]),
    ] {
        let (got, stdout) = conditioning(input, extra);
        assert_eq!(got.shape(), want.shape());
        assert_eq!(got.to_f64_vec(), want.to_f64_vec(), "{}", input.display());
        assert!(
            stdout.contains("signal tokens: 3 gathered from each of 2 sequences of 7 tokens (sequence 0 at [1, 2, 5])"),
            "{stdout}"
        );
    }
    // --signal-ids overrides the file's: [IMG1] alone is the token after [IMG0].
    let (one, stdout) = conditioning(&in_file, &["--signal-ids", "901"]);
    assert_ne!(one.to_f64_vec(), want.to_f64_vec());
    assert!(stdout.contains("(sequence 0 at [2])"), "{stdout}");
}

#[test]
fn llm_outputs_errors() {
    let s = Scratch::new("llmerr");
    let w = write_small(&s, "w.safetensors", "");
    let bare = write_llm_outputs(&s, "bare.safetensors", &LLM_TOKENS, vec![]);
    // No signal ids anywhere.
    expect_error(
        &run_cpu(&w, &bare, &[]),
        &["token_ids", "--signal-ids", "signal_ids"],
    );
    // Ids given, but nothing to find them in.
    expect_error(
        &run_cpu(&w, &small_input(&s), &["--signal-ids", "900"]),
        &["token_ids"],
    );
    let stray = s.path("stray.safetensors");
    let mut ts = vec![
        from_host("hidden", &tensor(&[2, 3, 16], 1)),
        signal_ids_tensor(&[900]),
    ];
    std::fs::write(&stray, raw_file(&ts)).unwrap();
    expect_error(
        &run_cpu(&w, &stray, &[]),
        &["token_ids", "stray.safetensors"],
    );
    expect_error(
        &run_small_random(&s, &["--signal-ids", "900"]),
        &["--signal-ids", "--input"],
    );
    // A signal token missing from a sequence, or out of order: the sequence named,
    // the token and the reason (sequence 0 is [1, 900, 901, 7, 8, 902, 901]).
    expect_error(
        &run_cpu(&w, &bare, &["--signal-ids", "900,903"]),
        &[
            "sequence 0:",
            "signal token 1 (id 903) is missing after position 1",
        ],
    );
    expect_error(
        &run_cpu(&w, &bare, &["--signal-ids", "902,900"]),
        &[
            "sequence 0:",
            "signal token 1 (id 900) appears only before signal token 0 (id 902)",
            "out of order",
        ],
    );
    // Id 7 is in sequence 0 (at 3) but not in sequence 1: the second one named.
    expect_error(
        &run_cpu(&w, &bare, &["--signal-ids", "7"]),
        &["sequence 1:", "signal token 0 (id 7) is missing"],
    );
    expect_error(
        &run_cpu(&w, &bare, &["--signal-ids", ""]),
        &["--signal-ids", "invalid value ''", "empty"],
    );
    expect_error(
        &run_cpu(&w, &bare, &["--signal-ids", "900,x"]),
        &["--signal-ids", "invalid value 'x'"],
    );
    // token_ids of the wrong shape or type.
    let short = write_llm_outputs(&s, "short.safetensors", &LLM_TOKENS[..12], vec![]);
    expect_error(
        &run_cpu(&w, &short, &["--signal-ids", "900"]),
        &["token_ids", "[2, 7]", "[2, 6]"],
    );
    ts = vec![
        from_host("hidden", &tensor(&[2, 7, 16], 6)),
        from_host("token_ids", &tensor(&[2, 7], 8)),
    ];
    let floats = s.path("float-ids.safetensors");
    std::fs::write(&floats, raw_file(&ts)).unwrap();
    expect_error(
        &run_cpu(&w, &floats, &["--signal-ids", "900"]),
        &["token_ids", "F32"],
    );
    // hidden of rank 2 with token ids.
    ts = vec![
        from_host("hidden", &tensor(&[7, 16], 6)),
        raw_tensor("token_ids", "I64", &[1, 7], vec![0; 56]),
    ];
    let flat = s.path("flat.safetensors");
    std::fs::write(&flat, raw_file(&ts)).unwrap();
    expect_error(
        &run_cpu(&w, &flat, &["--signal-ids", "900"]),
        &["hidden", "seq"],
    );
}

// ---------------------------------------------------------------------------
// Missing, empty, truncated and foreign files
// ---------------------------------------------------------------------------

#[test]
fn missing_weights_file() {
    let s = Scratch::new("missw");
    let input = small_input(&s);
    let out = run_cpu(&s.path("no-such-weights.safetensors"), &input, &[]);
    expect_error(&out, &["no-such-weights.safetensors"]);
}

#[test]
fn missing_input_file() {
    let s = Scratch::new("missi");
    let w = write_small(&s, "w.safetensors", "");
    let out = run_cpu(&w, &s.path("no-such-input.safetensors"), &[]);
    expect_error(&out, &["no-such-input.safetensors"]);
}

#[test]
fn weights_path_is_a_directory() {
    let s = Scratch::new("dirw");
    let input = small_input(&s);
    let dir = s.path("a-directory");
    std::fs::create_dir_all(&dir).unwrap();
    expect_error(&run_cpu(&dir, &input, &[]), &["a-directory"]);
}

#[test]
fn empty_files() {
    let s = Scratch::new("empty");
    let w = write_small(&s, "w.safetensors", "");
    let input = small_input(&s);
    let empty = s.path("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    expect_error(
        &run_cpu(&empty, &input, &[]),
        &["empty.safetensors", "safetensors"],
    );
    expect_error(
        &run_cpu(&w, &empty, &[]),
        &["empty.safetensors", "safetensors"],
    );
    // Shorter than the 8-byte header length.
    let short = s.path("short.safetensors");
    std::fs::write(&short, [1u8, 0, 0]).unwrap();
    expect_error(
        &run_cpu(&short, &input, &[]),
        &["short.safetensors", "header"],
    );
}

#[test]
fn truncated_files() {
    let s = Scratch::new("trunc");
    let w = write_small(&s, "w.safetensors", "");
    let input = small_input(&s);
    let bytes = std::fs::read(&w).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data_start = 8 + header_len;
    assert!(bytes.len() > data_start + 2);

    // Cut in the middle of the data.
    let cut = s.path("cut-data.safetensors");
    std::fs::write(&cut, &bytes[..data_start + (bytes.len() - data_start) / 2]).unwrap();
    expect_error(
        &run_cpu(&cut, &input, &[]),
        &["cut-data.safetensors", "safetensors"],
    );
    // One byte short.
    std::fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
    expect_error(
        &run_cpu(&cut, &input, &[]),
        &["cut-data.safetensors", "safetensors"],
    );
    // Cut inside the header.
    let cut = s.path("cut-header.safetensors");
    std::fs::write(&cut, &bytes[..8 + header_len / 2]).unwrap();
    expect_error(
        &run_cpu(&cut, &input, &[]),
        &["cut-header.safetensors", "header"],
    );

    // The same for the input.
    let ib = std::fs::read(&input).unwrap();
    let cut = s.path("cut-input.safetensors");
    std::fs::write(&cut, &ib[..ib.len() - 7]).unwrap();
    expect_error(
        &run_cpu(&w, &cut, &[]),
        &["cut-input.safetensors", "safetensors"],
    );
}

#[test]
fn files_that_are_not_safetensors() {
    let s = Scratch::new("foreign");
    let w = write_small(&s, "w.safetensors", "");
    let input = small_input(&s);

    // Random bytes.
    let mut x = 0x1234_5678_9abc_def0u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let f = s.path("noise.bin");
    std::fs::write(&f, &noise).unwrap();
    expect_error(&run_cpu(&f, &input, &[]), &["noise.bin", "safetensors"]);
    expect_error(&run_cpu(&w, &f, &[]), &["noise.bin", "safetensors"]);

    // Text.
    let f = s.path("notes.txt");
    std::fs::write(&f, "these are notes, not tensors\n".repeat(20)).unwrap();
    expect_error(&run_cpu(&f, &input, &[]), &["notes.txt", "safetensors"]);

    // Header length larger than the file.
    let f = s.path("long-header.safetensors");
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&f, &b).unwrap();
    expect_error(
        &run_cpu(&f, &input, &[]),
        &["long-header.safetensors", "header"],
    );

    // Header length u64::MAX.
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&f, &b).unwrap();
    expect_error(
        &run_cpu(&f, &input, &[]),
        &["long-header.safetensors", "header"],
    );

    // Header that is not JSON, and one that is not UTF-8.
    let f = s.path("bad-json.safetensors");
    std::fs::write(&f, raw("{\"hidden\": [1, 2", &[])).unwrap();
    expect_error(&run_cpu(&w, &f, &[]), &["bad-json.safetensors", "json"]);
    std::fs::write(
        &f,
        raw("{\"\u{ff}\"", &[])
            .into_iter()
            .map(|b| if b == 0xc3 { 0xff } else { b })
            .collect::<Vec<_>>(),
    )
    .unwrap();
    expect_error(
        &run_cpu(&w, &f, &[]),
        &["bad-json.safetensors", "safetensors"],
    );

    // Valid JSON with the wrong structure.
    std::fs::write(
        &f,
        raw(
            "{\"hidden\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}",
            &[0; 4],
        ),
    )
    .unwrap();
    expect_error(
        &run_cpu(&w, &f, &[]),
        &["bad-json.safetensors", "safetensors"],
    );

    // Offsets that do not cover the data (the data is longer than declared).
    let f = s.path("offsets.safetensors");
    let h = "{\"hidden\": {\"dtype\": \"F32\", \"shape\": [1, 1, 1], \"data_offsets\": [0, 4]}}";
    std::fs::write(&f, raw(h, &[0; 12])).unwrap();
    expect_error(
        &run_cpu(&w, &f, &[]),
        &["offsets.safetensors", "safetensors"],
    );
    // Offsets that disagree with the shape.
    let h = "{\"hidden\": {\"dtype\": \"F32\", \"shape\": [1, 1, 2], \"data_offsets\": [0, 4]}}";
    std::fs::write(&f, raw(h, &[0; 4])).unwrap();
    expect_error(
        &run_cpu(&w, &f, &[]),
        &["offsets.safetensors", "safetensors"],
    );
}

#[test]
fn shapes_whose_element_count_overflows() {
    let s = Scratch::new("overflow");
    let w = write_small(&s, "w.safetensors", "");
    let input = small_input(&s);
    let f = s.path("huge.safetensors");
    for (key, shape) in [
        ("hidden", "[4294967296, 4294967296, 16]"),
        ("hidden", "[2305843009213693952, 4, 1]"),
        ("hidden", "[1, 1, 2305843009213693952]"),
        ("hidden", "[18446744073709551615, 2, 1]"),
    ] {
        let h = format!(
            "{{\"{key}\": {{\"dtype\": \"F32\", \"shape\": {shape}, \"data_offsets\": [0, 0]}}}}"
        );
        std::fs::write(&f, raw(&h, &[])).unwrap();
        expect_error(&run_cpu(&w, &f, &[]), &["huge.safetensors", "overflow"]);
    }
    // In a checkpoint.
    let h = "{\"query_embs\": {\"dtype\": \"F16\", \"shape\": [4294967296, 4294967296, 16], \"data_offsets\": [0, 0]}}";
    std::fs::write(&f, raw(h, &[])).unwrap();
    expect_error(&run_cpu(&f, &input, &[]), &["huge.safetensors", "overflow"]);
}

// ---------------------------------------------------------------------------
// Keys, shapes, dtypes
// ---------------------------------------------------------------------------

#[test]
fn missing_hidden_key() {
    let s = Scratch::new("nohidden");
    let w = write_small(&s, "w.safetensors", "");
    let f = s.path("only-embeds.safetensors");
    write_tensors(&f, vec![("embeds", tensor(&[1, 3, 16], 1))]);
    expect_error(&run_cpu(&w, &f, &[]), &["`hidden`"]);
    // A checkpoint given as the input.
    expect_error(&run_cpu(&w, &w, &[]), &["`hidden`"]);
}

#[test]
fn missing_weight_key() {
    let s = Scratch::new("nokey");
    let input = small_input(&s);
    for key in [
        "tfm.decoder.layers.0.norm3.bias",
        "model.weight",
        "tfm.encoder.norm.weight",
        "fc.bias",
    ] {
        let w = write_small_edited(&s, "w.safetensors", |ts| ts.retain(|t| t.name != key));
        expect_error(&run_cpu(&w, &input, &[]), &[key]);
    }
    // No projector in the file at all.
    let w = write_small_edited(&s, "w.safetensors", |ts| {
        ts.retain(|t| t.name != "query_embs")
    });
    expect_error(&run_cpu(&w, &input, &[]), &["query_embs"]);
    // The input linear under neither name.
    let w = write_small_edited(&s, "w.safetensors", |ts| {
        ts.retain(|t| t.name != "fc.weight")
    });
    expect_error(&run_cpu(&w, &input, &[]), &["fc.weight"]);
}

/// A decoder layer whose first tensor is missing must not silently shorten the
/// model: the rest of that layer is in the file, so the file is broken.
#[test]
fn missing_key_in_a_later_layer_is_not_silently_dropped() {
    let s = Scratch::new("nolayer");
    let input = small_input(&s);
    let mut c = small_config();
    c.decoder_layers = 2;
    let w2 = ProjectorWeights::random(c, None, 1).unwrap();
    let mut ts: Vec<RawTensor> = w2
        .state_dict("")
        .iter()
        .map(|(k, v)| from_host(k, v))
        .collect();
    ts.retain(|t| t.name != "tfm.decoder.layers.1.norm1.weight");
    let w = s.path("w.safetensors");
    std::fs::write(&w, raw_file(&ts)).unwrap();
    expect_error(
        &run_cpu(&w, &input, &[]),
        &["tfm.decoder.layers.1.norm1.weight"],
    );
}

#[test]
fn wrong_weight_shape() {
    let s = Scratch::new("wshape");
    let input = small_input(&s);
    let w = write_small_edited(&s, "w.safetensors", |ts| {
        replace(ts, raw_tensor("fc.bias", "F32", &[7], f32_bytes(&[0.0; 7])))
    });
    expect_error(&run_cpu(&w, &input, &[]), &["fc.bias", "shape"]);
    let w = write_small_edited(&s, "w.safetensors", |ts| {
        replace(
            ts,
            raw_tensor(
                "tfm.encoder.layers.0.self_attn.in_proj_weight",
                "F32",
                &[8, 24],
                f32_bytes(&[0.0; 192]),
            ),
        )
    });
    expect_error(
        &run_cpu(&w, &input, &[]),
        &["tfm.encoder.layers.0.self_attn.in_proj_weight", "shape"],
    );
    // Wrong rank of a tensor the shapes are read from.
    let w = write_small_edited(&s, "w.safetensors", |ts| {
        replace(
            ts,
            raw_tensor("query_embs", "F32", &[3, 8], f32_bytes(&[0.0; 24])),
        )
    });
    expect_error(&run_cpu(&w, &input, &[]), &["query_embs", "shape"]);
    let w = write_small_edited(&s, "w.safetensors", |ts| {
        replace(
            ts,
            raw_tensor("fc.weight", "F32", &[128], f32_bytes(&[0.0; 128])),
        )
    });
    expect_error(&run_cpu(&w, &input, &[]), &["fc.weight", "shape"]);
    // A zero-sized dimension.
    let w = write_small_edited(&s, "w.safetensors", |ts| {
        replace(ts, raw_tensor("query_embs", "F32", &[1, 0, 8], vec![]))
    });
    expect_error(&run_cpu(&w, &input, &[]), &["n_out"]);
}

#[test]
fn wrong_dtypes() {
    let s = Scratch::new("dtype");
    let input = small_input(&s);
    let w = write_small_edited(&s, "w.safetensors", |ts| {
        replace(ts, raw_tensor("fc.bias", "I32", &[8], vec![0; 32]))
    });
    expect_error(&run_cpu(&w, &input, &[]), &["fc.bias", "dtype", "I32"]);
    let w = write_small_edited(&s, "w.safetensors", |ts| {
        replace(ts, raw_tensor("query_embs", "U8", &[1, 3, 8], vec![0; 24]))
    });
    expect_error(&run_cpu(&w, &input, &[]), &["query_embs", "dtype"]);
    let w = write_small_edited(&s, "w.safetensors", |ts| {
        replace(ts, raw_tensor("model.bias", "BOOL", &[5], vec![0; 5]))
    });
    expect_error(&run_cpu(&w, &input, &[]), &["model.bias", "dtype"]);

    let w = write_small(&s, "good.safetensors", "");
    let f = s.path("int-input.safetensors");
    std::fs::write(
        &f,
        raw_file(&[raw_tensor("hidden", "I64", &[1, 3, 16], vec![0; 8 * 48])]),
    )
    .unwrap();
    expect_error(&run_cpu(&w, &f, &[]), &["hidden", "dtype", "I64"]);
    let h = from_host("hidden", &tensor(&[1, 3, 16], 1));
    std::fs::write(
        &f,
        raw_file(&[h, raw_tensor("embeds", "I32", &[1, 3, 16], vec![0; 4 * 48])]),
    )
    .unwrap();
    expect_error(&run_cpu(&w, &f, &[]), &["embeds", "dtype", "I32"]);
    // An 8-bit float is a float, but not one this crate reads.
    std::fs::write(
        &f,
        raw_file(&[raw_tensor("hidden", "F8_E4M3", &[1, 3, 16], vec![0; 48])]),
    )
    .unwrap();
    expect_error(&run_cpu(&w, &f, &[]), &["hidden", "dtype"]);
}

#[test]
fn in_dim_mismatch_and_bad_input_rank() {
    let s = Scratch::new("indim");
    let w = write_small(&s, "w.safetensors", "");
    let f = write_input(&s, "in.safetensors", tensor(&[1, 3, 15], 1), None);
    expect_error(&run_cpu(&w, &f, &[]), &["hidden", "shape", "15"]);
    let f = write_input(
        &s,
        "in.safetensors",
        tensor(&[1, 3, 4096], 1),
        Some(tensor(&[1, 3, 4096], 2)),
    );
    expect_error(&run_cpu(&w, &f, &[]), &["hidden", "shape", "4096"]);
    let f = write_input(&s, "in.safetensors", tensor(&[3, 16], 1), None);
    expect_error(&run_cpu(&w, &f, &[]), &["hidden"]);
    let f = write_input(&s, "in.safetensors", tensor(&[1, 1, 3, 16], 1), None);
    expect_error(&run_cpu(&w, &f, &[]), &["hidden"]);
    let f = s.path("scalar.safetensors");
    std::fs::write(
        &f,
        raw_file(&[raw_tensor("hidden", "F32", &[], vec![0; 4])]),
    )
    .unwrap();
    expect_error(&run_cpu(&w, &f, &[]), &["hidden"]);
}

#[test]
fn embeds_shape_differs_from_hidden() {
    let s = Scratch::new("embeds");
    let w = write_small(&s, "w.safetensors", "");
    for shape in [
        &[2, 3, 15][..],
        &[2, 4, 16],
        &[1, 3, 16],
        &[6, 16],
        &[2, 3, 16, 1],
    ] {
        let f = write_input(
            &s,
            "in.safetensors",
            tensor(&[2, 3, 16], 1),
            Some(tensor(shape, 2)),
        );
        expect_error(&run_cpu(&w, &f, &[]), &["embeds", "shape"]);
    }
}

#[test]
fn n_in_against_the_audio_preset() {
    let s = Scratch::new("audio");
    // The full-size legacy audio projector, stored as f16 (about 64 MB).
    let config = ProjectorConfig::preset(Modality::Audio, Variant::Legacy);
    let w = ProjectorWeights::random(config, Some(Modality::Audio), 3).unwrap();
    let sd: BTreeMap<String, HostTensor> = w
        .state_dict("gen_text_hidden_fcs_audio.0.")
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16)))
        .collect();
    drop(w);
    let wp = s.path("audio.safetensors");
    weights::save(&wp, &sd, None).unwrap();
    drop(sd);

    // 3 signal tokens instead of 8.
    let f = write_input(
        &s,
        "in3.safetensors",
        tensor(&[1, 3, 4096], 1),
        Some(tensor(&[1, 3, 4096], 2)),
    );
    expect_error(&run_cpu(&wp, &f, &[]), &["hidden", "shape", "8"]);
    expect_error(
        &run_cpu(&wp, &f, &["--modality", "audio"]),
        &["hidden", "shape", "8"],
    );
    // From LLM outputs: 3 signal ids for a projector of 8.
    let h = from_host("hidden", &tensor(&[1, 5, 4096], 1));
    let ids = raw_tensor(
        "token_ids",
        "I32",
        &[1, 5],
        [7i32, 1, 2, 3, 9]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect(),
    );
    let llm = s.path("llm3.safetensors");
    std::fs::write(&llm, raw_file(&[h, ids])).unwrap();
    expect_error(
        &run_cpu(&wp, &llm, &["--signal-ids", "1,2,3"]),
        &["8 signal tokens", "3 signal ids"],
    );
    // The weights are not the image preset: not under its prefix, nor of its shapes.
    let f8 = write_input(&s, "in8.safetensors", tensor(&[1, 8, 4096], 1), None);
    expect_error(
        &run_cpu(&wp, &f8, &["--modality", "image"]),
        &[
            "gen_text_hidden_fcs.0.query_embs",
            "gen_text_hidden_fcs_audio.0.",
        ],
    );
    expect_error(
        &run_cpu(
            &wp,
            &f8,
            &[
                "--modality",
                "image",
                "--prefix",
                "gen_text_hidden_fcs_audio.0.",
            ],
        ),
        &["image", "preset"],
    );
    // Nor the v1.5 names.
    expect_error(&run_cpu(&wp, &f8, &["--variant", "v1.5"]), &["v1.5"]);
    // Control: 8 tokens run.
    let out_path = s.path("out.safetensors");
    expect_success(&run_cpu(
        &wp,
        &f8,
        &["--output", out_path.to_str().unwrap()],
    ));
    let y = TensorFile::open(&out_path)
        .unwrap()
        .get("conditioning")
        .unwrap();
    assert_eq!(y.shape(), &[1, 1, 512]);
}

#[test]
fn modality_preset_against_a_small_model() {
    let s = Scratch::new("smallpreset");
    let w = write_small(&s, "w.safetensors", "");
    let input = small_input(&s);
    expect_error(
        &run_cpu(&w, &input, &["--modality", "image"]),
        &["image", "preset"],
    );
}

// ---------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------

#[test]
fn non_finite_inputs() {
    let s = Scratch::new("nonfinite");
    let w = write_small(&s, "w.safetensors", "");
    for (key, bad) in [
        ("hidden", f32::NAN),
        ("hidden", f32::INFINITY),
        ("hidden", f32::NEG_INFINITY),
        ("embeds", f32::NAN),
        ("embeds", f32::NEG_INFINITY),
    ] {
        let mut h = tensor(&[2, 3, 16], 1).to_f32_vec();
        let mut e = tensor(&[2, 3, 16], 2).to_f32_vec();
        let v = if key == "hidden" { &mut h } else { &mut e };
        v[37] = bad;
        let f = write_input(
            &s,
            "in.safetensors",
            HostTensor::from_f32(vec![2, 3, 16], h).unwrap(),
            Some(HostTensor::from_f32(vec![2, 3, 16], e).unwrap()),
        );
        expect_error(&run_cpu(&w, &f, &[]), &[key, "non-finite"]);
    }
    // In f16, and in f64.
    let mut h = tensor(&[1, 3, 16], 1).to_f64_vec();
    h[5] = f64::NAN;
    let t = HostTensor::from_f64(vec![1, 3, 16], h).unwrap();
    let f = write_input(&s, "in.safetensors", t.to_dtype(DType::F16), None);
    expect_error(&run_cpu(&w, &f, &[]), &["hidden", "non-finite"]);
    let f = write_input(&s, "in.safetensors", t, None);
    expect_error(&run_cpu(&w, &f, &[]), &["hidden", "non-finite"]);
}

#[test]
fn non_finite_weights() {
    let s = Scratch::new("nanweight");
    let input = small_input(&s);
    for (key, n, bad) in [
        ("tfm.encoder.layers.0.linear1.weight", 16 * 8, f32::NAN),
        ("query_embs", 24, f32::INFINITY),
        ("model.bias", 5, f32::NEG_INFINITY),
    ] {
        let w = write_small_edited(&s, "w.safetensors", |ts| {
            let shape = ts.iter().find(|t| t.name == key).unwrap().shape.clone();
            let mut v = vec![0.5f32; n];
            v[n / 2] = bad;
            replace(ts, raw_tensor(key, "F32", &shape, f32_bytes(&v)));
        });
        expect_error(&run_cpu(&w, &input, &[]), &[key, "non-finite"]);
    }
}

#[test]
fn empty_batch_and_no_signal_tokens() {
    let s = Scratch::new("batch0");
    let w = write_small(&s, "w.safetensors", "");
    let f = write_input(
        &s,
        "in.safetensors",
        tensor(&[0, 3, 16], 1),
        Some(tensor(&[0, 3, 16], 2)),
    );
    expect_error(&run_cpu(&w, &f, &[]), &["batch"]);
    let f = write_input(&s, "in.safetensors", tensor(&[0, 3, 16], 1), None);
    expect_error(&run_cpu(&w, &f, &[]), &["batch"]);
    let f = write_input(&s, "in.safetensors", tensor(&[2, 0, 16], 1), None);
    expect_error(&run_cpu(&w, &f, &[]), &["n_in"]);
    // Zero-sized with huge other dimensions: no overflow, still batch 0.
    let h = "{\"hidden\": {\"dtype\": \"F32\", \"shape\": [0, 4611686018427387904, 16], \"data_offsets\": [0, 0]}}";
    let f = s.path("zero.safetensors");
    std::fs::write(&f, raw(h, &[])).unwrap();
    expect_error(&run_cpu(&w, &f, &[]), &["batch"]);
}

// ---------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------

fn run_small_random(s: &Scratch, extra: &[&str]) -> Output {
    let w = write_small(s, "w.safetensors", "");
    let mut args = vec![
        "run".to_string(),
        "--device".into(),
        "cpu".into(),
        "--weights".into(),
    ];
    args.push(w.to_str().unwrap().to_string());
    args.extend(extra.iter().map(|a| a.to_string()));
    outproj(args)
}

#[test]
fn random_input_batch_sizes() {
    let s = Scratch::new("batcharg");
    expect_error(&run_small_random(&s, &["--batch", "0"]), &["batch"]);
    // The element count of [batch, 4, 16] overflows usize.
    expect_error(
        &run_small_random(&s, &["--batch", "18446744073709551615"]),
        &["batch", "overflow"],
    );
    expect_error(
        &run_small_random(&s, &["--batch", "4611686018427387904"]),
        &["batch", "overflow"],
    );
    // Does not overflow usize, but no machine holds it: a clean error, not an abort.
    expect_error(
        &run_small_random(&s, &["--batch", "144115188075855872"]),
        &["batch"],
    );
    expect_error(
        &run_small_random(&s, &["--batch", "1125899906842624"]),
        &["batch"],
    );
    // Not a number at all (the argument parser).
    expect_error(&run_small_random(&s, &["--batch", "-1"]), &["batch"]);
    expect_error(
        &run_small_random(&s, &["--batch", "18446744073709551616"]),
        &["batch"],
    );
    expect_error(&run_small_random(&s, &["--batch", "two"]), &["batch"]);
}

#[test]
fn unknown_device() {
    let s = Scratch::new("device");
    let w = write_small(&s, "w.safetensors", "");
    let input = small_input(&s);
    for d in ["tpu", "", "CPU", "cuda:0"] {
        let out = outproj([
            "run",
            "--device",
            d,
            "--weights",
            w.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ]);
        expect_error(&out, &["device", d]);
    }
    expect_error(&outproj(["check", "--device", "tpu"]), &["tpu"]);
    expect_error(&outproj(["bench", "--device", "tpu"]), &["tpu"]);
}

#[test]
fn unknown_or_unsupported_precision() {
    let s = Scratch::new("precision");
    let w = write_small(&s, "w.safetensors", "");
    let input = small_input(&s);
    for p in ["f8", "", "F32", "fp16"] {
        expect_error(&run_cpu(&w, &input, &["--precision", p]), &["precision", p]);
        expect_error(&outproj(["check", "--precision", p]), &["precision", p]);
        expect_error(&outproj(["bench", "--precision", p]), &["precision", p]);
    }
    // The reference computes in float64 only, the CPU backend in f32 (and
    // its GEMMs in bf16 or f16).
    for p in ["tf32", "f16", "bf16"] {
        expect_error(
            &run_device("reference", &w, &input, &["--precision", p]),
            &["--precision", p, "float64"],
        );
    }
    expect_error(
        &run_cpu(&w, &input, &["--precision", "tf32"]),
        &[
            "--precision",
            "tf32",
            "CPU backend computes in f32, or its GEMMs in bf16 or f16",
        ],
    );
    for p in ["f32", "bf16", "f16"] {
        let out = run_cpu(&w, &input, &["--precision", p]);
        expect_success(&out);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("on cpu ({p})")),
            "{out:?}"
        );
    }
    // Without --device, only backends computing in that precision run (CUDA
    // for TF32): where there is none, one line saying so.
    let out = outproj([
        "bench",
        "--precision",
        "tf32",
        "--batch",
        "1",
        "--seconds",
        "0.01",
    ]);
    expect_success_or_error(
        &out,
        &["--precision tf32", "no backend here computes in it"],
    );
    // wgpu has no TF32: an error naming the precision, or (without an adapter,
    // which REQUIRE_WGPU=1 rules out) the backend's own reason it is absent.
    let out = outproj([
        "bench",
        "--device",
        "wgpu",
        "--precision",
        "tf32",
        "--seconds",
        "0.01",
    ]);
    let line = expect_error(&out, &[]);
    if !required("REQUIRE_WGPU") && line.contains("backend `wgpu` is not available") {
        println!("skipped: bench --device wgpu --precision tf32: {line}");
        return;
    }
    expect_error(
        &out,
        &[
            "--precision tf32",
            "wgpu computes in f32, f16, or f32 with bf16",
        ],
    );
    // bf16 there is f32 tensors with the GEMMs' weights in bf16.
    let out = run_device("wgpu", &w, &input, &["--precision", "bf16"]);
    expect_success(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("on wgpu (bf16)"),
        "{out:?}"
    );
}

/// The device `outproj run` says it computed on (`conditioning: [..] on D (..)`).
#[track_caller]
fn ran_on(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let on = stdout
        .lines()
        .find_map(|l| l.strip_prefix("conditioning: "))
        .and_then(|l| l.split(" on ").nth(1))
        .and_then(|l| l.split(' ').next());
    match on {
        Some(d) => d.to_string(),
        None => panic!("no `conditioning: .. on D` line:\n{}", describe(out)),
    }
}

/// On a machine without the GPU (or without the cargo feature) these are clean
/// errors saying the backend is not available, and nothing else: a backend that
/// is there but fails is a failure. Where the backend works they succeed, on it.
/// With REQUIRE_WGPU=1 (CI: lavapipe) wgpu must run.
#[test]
fn gpu_devices_fail_cleanly_or_run() {
    let s = Scratch::new("gpu");
    let w = write_small(&s, "w.safetensors", "");
    let input = small_input(&s);
    let run = |d: &str| {
        outproj([
            "run",
            "--device",
            d,
            "--weights",
            w.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ])
    };
    let mut usable = Vec::new();
    for d in ["cuda", "wgpu"] {
        let out = run(d);
        if out.status.success() || (d == "wgpu" && required("REQUIRE_WGPU")) {
            expect_success(&out);
            assert_eq!(ran_on(&out), d, "{}", describe(&out));
            usable.push(d);
        } else {
            let line = expect_error(&out, &[&format!("backend `{d}` is not available: ")]);
            println!("skipped: {d} run: {line}");
        }
    }
    // auto takes CUDA, else wgpu on a GPU, else the CPU backend, which is
    // always there (and faster than wgpu on a CPU adapter such as lavapipe).
    let info = String::from_utf8_lossy(&outproj(["info"]).stdout).into_owned();
    let wgpu_is_a_cpu = info
        .lines()
        .any(|l| l.starts_with("wgpu ") && l.contains(", Cpu)"));
    let expected = usable
        .into_iter()
        .find(|&d| d == "cuda" || !wgpu_is_a_cpu)
        .unwrap_or("cpu");
    let out = run("auto");
    expect_success(&out);
    assert_eq!(ran_on(&out), expected, "{}\n{info}", describe(&out));
    // The reference is a device too, always there.
    let out = run("reference");
    expect_success(&out);
    assert_eq!(ran_on(&out), "reference", "{}", describe(&out));
}

#[test]
fn unknown_names() {
    let s = Scratch::new("names");
    let w = write_small(&s, "w.safetensors", "");
    let input = small_input(&s);
    expect_error(
        &run_cpu(&w, &input, &["--modality", "smell"]),
        &["modality", "smell"],
    );
    expect_error(
        &run_cpu(&w, &input, &["--variant", "v2"]),
        &["variant", "v2"],
    );
    expect_error(
        &run_cpu(&w, &input, &["--out-dtype", "f8"]),
        &["dtype", "f8"],
    );
    // Also without --weights (random preset weights are never built).
    expect_error(
        &outproj(["run", "--device", "cpu", "--modality", "smell"]),
        &["smell"],
    );
    expect_error(
        &outproj(["run", "--device", "cpu", "--variant", "v2"]),
        &["v2"],
    );
    expect_error(
        &outproj(["bench", "--device", "cpu", "--modality", "smell"]),
        &["smell"],
    );
}

#[test]
fn heads() {
    let s = Scratch::new("heads");
    let w = write_small(&s, "w.safetensors", "");
    let input = small_input(&s);
    expect_error(&run_cpu(&w, &input, &["--heads", "0"]), &["heads"]);
    expect_error(&run_cpu(&w, &input, &["--heads", "3"]), &["divisible", "3"]);
    expect_error(
        &run_cpu(&w, &input, &["--heads", "16"]),
        &["divisible", "16"],
    );
    expect_error(
        &outproj(["run", "--device", "cpu", "--heads", "0"]),
        &["heads"],
    );
    expect_error(
        &outproj(["run", "--device", "cpu", "--heads", "3"]),
        &["divisible"],
    );
    // Control: every divisor of d_model 8 runs.
    for h in ["1", "2", "4", "8"] {
        expect_success(&run_cpu(&w, &input, &["--heads", h]));
    }
}

#[test]
fn prefixes() {
    let s = Scratch::new("prefixes");
    let input = small_input(&s);
    let w = write_small(&s, "w.safetensors", "");
    expect_error(
        &run_cpu(&w, &input, &["--prefix", "nonexistent."]),
        &["nonexistent."],
    );
    let w = write_small(&s, "wp.safetensors", "a.");
    expect_error(&run_cpu(&w, &input, &["--prefix", ""]), &["query_embs"]);

    // Two projectors in one checkpoint.
    let mut sd = small_weights(1).state_dict("first.");
    sd.extend(small_weights(2).state_dict("second."));
    let two = s.path("two.safetensors");
    weights::save(&two, &sd, None).unwrap();
    expect_error(&run_cpu(&two, &input, &[]), &["first.", "second."]);
    expect_success(&run_cpu(&two, &input, &["--prefix", "second."]));
    // --modality does not pick either (neither is under a NExT-GPT prefix).
    expect_error(
        &run_cpu(&two, &input, &["--modality", "audio"]),
        &["query_embs"],
    );
}

#[test]
fn output_path_problems() {
    let s = Scratch::new("output");
    let w = write_small(&s, "w.safetensors", "");
    let input = small_input(&s);
    let p = s.path("no-such-dir").join("out.safetensors");
    expect_error(
        &run_cpu(&w, &input, &["--output", p.to_str().unwrap()]),
        &["no-such-dir"],
    );
    let d = s.path("is-a-dir");
    std::fs::create_dir_all(&d).unwrap();
    expect_error(
        &run_cpu(&w, &input, &["--output", d.to_str().unwrap()]),
        &["is-a-dir"],
    );
}

#[test]
fn kernels_and_bench_arguments() {
    for arch in ["foo", "sm_", "sm_abc", "sm_-1", "SM_90"] {
        expect_error(&outproj(["kernels", "--arch", arch]), &["arch"]);
    }
    // A well-formed arch gets to the other arguments: a --cubin-dir that is a
    // file is refused before minutes of compiling (tests/toolchain.rs runs
    // the compiles).
    let s = Scratch::new("kernels");
    let file = s.path("not-a-folder");
    std::fs::write(&file, b"x").unwrap();
    let out = outproj([
        "kernels",
        "--arch",
        "sm_90",
        "--cubin-dir",
        file.to_str().unwrap(),
    ]);
    expect_error(
        &out,
        &[if cfg!(feature = "cuda") {
            "--cubin-dir"
        } else {
            "cuda"
        }],
    );
    // So is a --kernel-cache that is a file, given or from the environment.
    let out = outproj([
        "kernels",
        "--arch",
        "sm_90",
        "--kernel-cache",
        file.to_str().unwrap(),
    ]);
    let flag = if cfg!(feature = "cuda") {
        "--kernel-cache"
    } else {
        "cuda"
    };
    expect_error(&out, &[flag]);
    let out = Command::new(env!("CARGO_BIN_EXE_outproj"))
        .args(["kernels", "--arch", "sm_90", "--kernel-cache"])
        .env("OUTPROJ_KERNEL_CACHE", &file)
        .output()
        .expect("running outproj");
    expect_error(&out, &[flag]);
    // `native` needs a device: where there is none, the error says why.
    #[cfg(feature = "cuda")]
    if !output_projector::cuda::driver_present() {
        expect_error(
            &outproj(["kernels", "--arch", "native"]),
            &["cuda", "libcuda"],
        );
    }

    expect_error(
        &outproj(["bench", "--device", "cpu", "--batch", "0"]),
        &["batch"],
    );
    expect_error(
        &outproj(["bench", "--device", "cpu", "--batch", "1,,2"]),
        &["batch"],
    );
    expect_error(
        &outproj(["bench", "--device", "cpu", "--batch", "x"]),
        &["batch"],
    );
    expect_error(
        &outproj([
            "bench",
            "--device",
            "cpu",
            "--batch",
            "18446744073709551615",
        ]),
        &["batch"],
    );
    expect_error(
        &outproj(["bench", "--device", "cpu", "--batch", "1099511627776"]),
        &["batch"],
    );
    for secs in ["0", "-1", "NaN", "inf"] {
        expect_error(
            &outproj(["bench", "--device", "cpu", "--seconds", secs]),
            &["seconds"],
        );
    }
}

/// `outproj bench` on both CPU devices: every row timed, the forward over its
/// 8 rotating inputs, each op on one argument set (no cache size to beat);
/// the CPU backend's v1 rows beside its own. The audio projector: one query,
/// the quickest forward of the presets.
#[test]
fn bench_times_every_row_on_the_cpu() {
    for device in ["reference", "cpu"] {
        let out = outproj([
            "bench",
            "--device",
            device,
            "--modality",
            "audio",
            "--batch",
            "1",
            "--seconds",
            "0.01",
            "--json",
        ]);
        expect_success(&out);
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}\n{}", describe(&out)));
        let field = |r: &serde_json::Value, k: &str| r[k].clone();
        let what: Vec<String> = rows
            .iter()
            .map(|r| field(r, "what").as_str().unwrap_or("").to_string())
            .collect();
        let mut ops = vec![
            "projector",
            "linear",
            "layer_norm",
            "attention",
            "attention_absorbed",
        ];
        if device == "cpu" {
            ops.extend(["projector v1", "linear v1", "attention v1"]);
        }
        for op in ops {
            assert!(
                what.iter().any(|w| w == op),
                "{device}: no `{op}` row in {what:?}"
            );
        }
        for r in &rows {
            assert_eq!(field(r, "device"), device, "{r}");
            let us = field(r, "median_us").as_f64().unwrap_or(f64::NAN);
            assert!(us.is_finite() && us > 0.0, "{r}");
            let sets = field(r, "buffers").as_u64();
            let forward = field(r, "what")
                .as_str()
                .is_some_and(|w| w.starts_with("projector"));
            assert_eq!(sets, Some(if forward { 8 } else { 1 }), "{r}");
        }
    }
}

#[test]
fn argument_parser_errors_are_one_line() {
    expect_error(&outproj(["run", "--no-such-flag"]), &["--no-such-flag"]);
    expect_error(&outproj(["frobnicate"]), &["frobnicate"]);
    expect_error(&outproj(["run", "--heads", "-2"]), &["heads"]);
    expect_error(&outproj(["run", "--seed", "-2"]), &["seed"]);
    expect_error(&outproj(["run", "--weights"]), &["weights"]);
    expect_error(&outproj(Vec::<&str>::new()), &["command", "run"]);
}

/// A small checkpoint and a small input whose product is huge: 2^16 batch rows
/// times 2^20 learned queries. The decoder's buffers cannot be allocated; that must
/// be an error, not an abort.
#[test]
fn activations_too_large_for_memory_are_an_error() {
    let s = Scratch::new("amplify");
    let c = ProjectorConfig {
        in_dim: 1,
        d_model: 8,
        heads: 1,
        ffn_dim: 8,
        n_out: 1 << 20,
        out_dim: 1,
        ..small_config()
    };
    let w = s.path("w.safetensors");
    ProjectorWeights::random(c, None, 1)
        .unwrap()
        .save(&w, "")
        .unwrap();
    let h = HostTensor::from_f32(vec![1 << 16, 1, 1], vec![0.25; 1 << 16])
        .unwrap()
        .to_dtype(DType::F16);
    let f = write_input(&s, "in.safetensors", h, None);
    expect_error(&run_cpu(&w, &f, &[]), &["memory"]);
}
