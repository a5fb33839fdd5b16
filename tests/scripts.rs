//! The scripts that run on the GPU machine (scripts/gpu-check.sh and the Python it
//! calls) are checked here on fixtures, so that a broken script is found before it
//! costs a GPU run. Needs python3 and bash, which scripts/test.sh needs anyway.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh folder under the target dir's test scratch space.
fn scratch(name: &str) -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Runs `program args`; its stdout when it succeeds, else an error with both streams.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(stdout)
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<String, String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path.display().to_string())
}

/// Runs scripts/gpu-check.sh with `outproj` at `outproj`, its output folder `out`
/// and the environment `env`; (whether it succeeded, its stdout).
fn gpu_check(outproj: &Path, out: &Path, env: &[(&str, &str)]) -> Result<(bool, String), String> {
    let result = Command::new("bash")
        .arg("scripts/gpu-check.sh")
        .current_dir(root())
        .env("OUTPROJ", outproj)
        .env("OUT", out)
        .envs(env.iter().copied())
        .output()
        .map_err(|e| format!("running gpu-check.sh: {e}"))?;
    Ok((
        result.status.success(),
        String::from_utf8_lossy(&result.stdout).into_owned(),
    ))
}

/// ncu's CSV (with its own log lines first) for three launches.
const NCU_CSV: &str = r#"==PROF== Connected to process 1234
==PROF== Profiling "linear_tiled_vec4": 0%....50%....100% - 1 pass
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1234","outproj","127.0.0.1","linear_tiled_vec4","1","13","(256, 1, 1)","(8, 1, 32)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","3,456"
"1","1234","outproj","127.0.0.1","layer_norm_warp_vec4","1","13","(128, 1, 1)","(20, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","2.10"
"2","1234","outproj","127.0.0.1","linear_tiled_vec4","1","13","(256, 1, 1)","(8, 2, 8)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","4000"
"#;

#[test]
fn profile_summary_reads_ncu_csv() -> Result<(), String> {
    let dir = scratch("profile_summary")?;
    let csv = write(&dir.join("k.csv"), NCU_CSV)?;
    let md = run(
        "python3",
        &[
            "scripts/profile_summary.py",
            &csv,
            "--title",
            "f32, batch 1",
        ],
    )?;
    let want = [
        "### f32, batch 1: 3 kernels, 9.6 µs of device time",
        "| `linear_tiled_vec4` | 2 | 7.5 | 3.73 | 78 % |",
        "| `layer_norm_warp_vec4` | 1 | 2.1 | 2.10 | 22 % |",
        "| 2 | `linear_tiled_vec4` | (8, 2, 8) | (256, 1, 1) | 4.00 |",
    ];
    for line in want {
        assert!(md.contains(line), "missing {line:?} in\n{md}");
    }
    // No kernel rows: an error, not an empty table.
    let empty = write(&dir.join("empty.csv"), "==PROF== nothing\n")?;
    assert!(run("python3", &["scripts/profile_summary.py", &empty]).is_err());
    Ok(())
}

/// `outproj bench --json` rows (bf16, batch 1) for compare_bench.py.
const OURS_BF16: &str = r#"[
 {"device":"cuda","precision":"bf16","what":"projector","shape":"image batch 1","median_us":500,
  "min_us":490,"host_us":310,"device_us":480,"burst_us":400,"runs":10,"gflops":1,"gbytes_per_s":1,"launches":71},
 {"device":"cuda","precision":"bf16","what":"projector graph","shape":"image batch 1","median_us":70,
  "min_us":69,"host_us":9.5,"device_us":68,"burst_us":66,"runs":10,"gflops":1,"gbytes_per_s":1,"launches":71},
 {"device":"cuda","precision":"bf16","what":"projector graph serial","shape":"image batch 1","median_us":105,
  "min_us":100,"device_us":104,"burst_us":99,"runs":10,"gflops":1,"gbytes_per_s":1,"launches":71},
 {"device":"cuda","precision":"bf16","what":"projector graph split-K in memory","shape":"image batch 1",
  "median_us":84,"min_us":80,"device_us":83,"burst_us":80,"runs":10,"gflops":1,"gbytes_per_s":1,"launches":71},
 {"device":"cuda","precision":"bf16","what":"projector graph layer_norms apart","shape":"image batch 1",
  "median_us":77,"min_us":76,"device_us":76,"burst_us":75,"runs":10,"gflops":1,"gbytes_per_s":1,"launches":71},
 {"device":"cuda","precision":"bf16","what":"projector graph attention apart","shape":"image batch 1",
  "median_us":73.5,"min_us":73,"device_us":72,"burst_us":71,"runs":10,"gflops":1,"gbytes_per_s":1,"launches":71},
 {"device":"cuda","precision":"bf16","what":"projector graph literal cross-attention","shape":"image batch 1",
  "median_us":90,"min_us":89,"device_us":88,"burst_us":87,"runs":10,"gflops":1,"gbytes_per_s":1,"launches":77},
 {"device":"cuda","precision":"bf16","what":"attention_absorbed","shape":"B1 Lq77 Lk4 H4 C512","median_us":9,
  "min_us":8,"device_us":6,"burst_us":5,"runs":10,"gflops":1,"gbytes_per_s":1,"launches":null},
 {"device":"cuda","precision":"bf16","what":"linear","shape":"77x1536x512","median_us":20,
  "min_us":19,"device_us":12,"burst_us":6.5,"runs":10,"gflops":1,"gbytes_per_s":1,"launches":null},
 {"device":"cuda","precision":"bf16","what":"linear wmma","shape":"77x1536x512","median_us":30,
  "min_us":29,"device_us":22,"burst_us":16.5,"runs":10,"gflops":1,"gbytes_per_s":1,"launches":null},
 {"device":"cuda","precision":"bf16","what":"linear square","shape":"77x1536x512","median_us":25,
  "min_us":24,"device_us":20,"burst_us":15,"runs":10,"gflops":1,"gbytes_per_s":1,"launches":null}
]"#;

/// scripts/torch_baseline.py's JSON for the same precision and batch.
const TORCH_BASELINE: &str = r#"{"environment":{"torch":"2.x","device_name":"H200","device":"cuda","copy_gbytes_per_s":4177},
 "rows":[
  {"precision":"bf16","batch":1,"what":"eager","shape":"image batch 1","median_us":2857,"status":"ok"},
  {"precision":"bf16","batch":1,"what":"compile reduce-overhead","shape":"image batch 1","median_us":540,"status":"ok"},
  {"precision":"bf16","batch":1,"what":"compile default","shape":"image batch 1","status":"skipped: time budget"},
  {"precision":"bf16","batch":1,"what":"linear","shape":"77x1536x512","median_us":37.2,"status":"ok"}]}"#;

#[test]
fn compare_bench_marks_targets_notes_bursts_baselines_and_graphs_without_features(
) -> Result<(), String> {
    let dir = scratch("compare_bench")?;
    let ours = write(&dir.join("bench-cuda-bf16.json"), OURS_BF16)?;
    let torch = write(&dir.join("torch-baseline.json"), TORCH_BASELINE)?;
    let md = run(
        "python3",
        &[
            "scripts/compare_bench.py",
            "--ours",
            &ours,
            "--torch",
            &torch,
        ],
    )?;
    let want = [
        "| batch 1 bf16 ≤ 80 µs with graph replay | 70.0 µs | 80 µs | met |",
        "| batch 1 bf16 ≥ 10x faster than PyTorch eager | 70.0 µs | eager 2857 µs (40.8x) | met |",
        "| batch 1 bf16 faster than torch.compile | 70.0 µs | best compile 540 µs | met |",
        "| batch 64 bf16 ≤ 1 ms | not measured | 1000 µs | not measured |",
        "| ours: projector | image batch 1 | 500 | | | host 310 µs until the call returned |",
        "| ours: projector graph | image batch 1 | 70.0 | | | host 9.5 µs until the call returned |",
        "| ours: projector graph serial launches | image batch 1 | 105 | | | dependent launch 1.50x faster |",
        "| ours: projector graph split-K in memory | image batch 1 | 84.0 | | | cluster split-K (and the decoder's folded norms) 1.20x faster |",
        "| ours: projector graph layer_norms apart | image batch 1 | 77.0 | | | folded layer_norms 1.10x faster |",
        "| ours: projector graph attention apart | image batch 1 | 73.5 | | | folded attention 1.05x faster |",
        "| all rounds so far | bf16 batch 1: 95-210 µs | projector graph 70.0 µs | holds |",
        "| 11: absorbed cross-attention | bf16 `attention_absorbed` B1 Lq77 Lk4 H4 C512: ≤ 4 µs | 5.0 µs | **refuted** |",
        "| 11: absorbed cross-attention | bf16 batch 1: `projector graph literal cross-attention` ≥ 12 µs slower than `projector graph` | 20.0 µs slower | holds |",
        "| 10: warpgroup MMA (v6) | bf16 `linear` 4928x512x2048 none: ≥ 1.5x faster than `linear mma.sync` | not measured | not measured |",
        "| 12: v6 one MMA group in flight | bf16 `linear` 4928x2048x512 relu: ≥ 1.05x faster than `linear wgmma serial` | not measured | not measured |",
        "| linear vs F.linear (cuBLAS) | 77x1536x512 | 20.0 | 37.2 | 1.86x | ours 6.5 µs per run back to back; v3 WMMA 30.0 µs (1.50x ours); v5 128x128 tiles 25.0 µs (1.25x ours) |",
    ];
    for line in want {
        assert!(md.contains(line), "missing {line:?} in\n{md}");
    }
    // A PyTorch row the time budget left out says so.
    assert!(
        md.lines()
            .any(|l| l.starts_with("| torch.compile (default) |")
                && l.ends_with("| skipped: time budget |")),
        "{md}"
    );
    Ok(())
}

#[test]
fn deep_summary_reads_ncu_raw_csv() -> Result<(), String> {
    let dir = scratch("deep_summary")?;
    let csv = write(
        &dir.join("deep.csv"),
        r#"==PROF== Connected to process 1234
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","gpu__time_duration.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed","dram__throughput.avg.pct_of_peak_sustained_elapsed","launch__registers_per_thread","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_selected_per_issue_active.ratio","smsp__average_warps_issue_stalled_membar_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active","l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum"
"","","","","","","","","","","","nsecond","%","%","register/thread","ratio","ratio","ratio","ratio","ratio","%",""
"0","1234","outproj","127.0.0.1","linear_tiled_vec4","1","13","(256, 1, 1)","(8, 2, 8)","0","9.0","13,520","12.3","4.5","80","21.7","3.2","1.0","9.9","0.5","41.25","1,024"
"#,
    )?;
    let md = run(
        "python3",
        &["scripts/deep_summary.py", &csv, "--title", "t"],
    )?;
    let want = "| `linear_tiled_vec4` | (8, 2, 8) | (256, 1, 1) | 13.52 | 12.3 | - | 4.5 | - | - \
                | 80 | - | 41.2 | 1024 | - | long_scoreboard 21.7, membar 9.9, barrier 3.2 |";
    assert!(md.contains(want), "missing {want:?} in\n{md}");
    assert!(md.starts_with("### t: 1 launches"), "{md}");
    let empty = write(
        &dir.join("empty.csv"),
        "==PROF== No kernels were profiled.\n",
    )?;
    assert!(run("python3", &["scripts/deep_summary.py", &empty]).is_err());
    Ok(())
}

#[test]
fn gpu_check_parses_and_skips_what_is_not_asked() -> Result<(), String> {
    run("bash", &["-n", "scripts/gpu-check.sh"])?;
    // No step group asked for: only the setup steps and `info` run, each other
    // group is recorded as skipped, and the script succeeds.
    let dir = scratch("gpu_check")?;
    let outproj = Path::new(env!("CARGO_BIN_EXE_outproj"));
    let (ok, stdout) = gpu_check(outproj, &dir, &[("STEPS", "none")])?;
    assert!(ok, "{stdout}");
    for group in [
        "check",
        "check-precisions",
        "bench",
        "torch",
        "compare",
        "profile",
        "deep",
        "sanitizer",
        "wgpu",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(group) && l.contains("skip") && l.contains("not in STEPS")),
            "{group} not recorded as skipped:\n{stdout}"
        );
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("kernels") && l.contains("skip")),
        "{stdout}"
    );
    let summary = read(&dir.join("summary.txt"))?;
    assert!(summary.contains("info"), "{summary}");
    Ok(())
}

#[test]
fn gpu_check_keeps_to_its_time_budget() -> Result<(), String> {
    // A stub `outproj` whose check hangs: the check is stopped where the budget
    // runs out, the bench steps after it are skipped (not failed), compare still
    // runs in the reserve, and the summary is written, all within the budget.
    let dir = scratch("gpu_check_budget")?;
    let stub = dir.join("outproj");
    write(
        &stub,
        r#"#!/usr/bin/env bash
case $1 in
    --version) echo "outproj stub" ;;
    info) echo "cuda   available  stub" ;;
    check) sleep 60 ;;
    bench) [[ $2 == --help ]] && echo "--precision" ;;
    kernels) echo "$* into ${OUTPROJ_KERNEL_CACHE:-no cache}" ;;
esac
"#,
    )?;
    run("chmod", &["+x", &stub.display().to_string()])?;
    let out_dir = dir.join("out");
    let started = std::time::Instant::now();
    let (ok, stdout) = gpu_check(
        &stub,
        &out_dir,
        &[
            ("STEPS", "check bench compare"),
            ("BATCHES", "1"),
            ("PRECISIONS", "f32 bf16"),
            ("BUDGET", "6"),
            ("RESERVE", "1"),
            ("MIN_STEP", "2"),
        ],
    )?;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(!ok, "the stopped check is a failure:\n{stdout}");
    assert!(
        elapsed < 20.0,
        "{elapsed:.1} s for a budget of 6 s:\n{stdout}"
    );
    let line = |step: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(step))
            .unwrap_or("")
            .to_string()
    };
    // The kernels compiled first, into the kernel cache, which is on.
    let kernels = line("kernels");
    assert!(
        kernels.contains(" ok ") && kernels.contains("--arch native --kernel-cache into 1"),
        "{kernels}\n{stdout}"
    );
    let check = line("check-cuda");
    assert!(
        check.contains("FAIL") && check.contains("time budget"),
        "{check}\n{stdout}"
    );
    for step in ["bench-cuda-f32-b1", "bench-cuda-bf16-b1"] {
        let l = line(step);
        assert!(
            l.contains("skip") && l.contains("time budget"),
            "{l}\n{stdout}"
        );
    }
    assert!(line("compare").contains("skip"), "{stdout}");
    assert!(
        line("check-precisions").contains("not in STEPS"),
        "{stdout}"
    );
    let summary = read(&out_dir.join("summary.txt"))?;
    assert!(summary.contains("bench-cuda-bf16-b1"), "{summary}");
    Ok(())
}

#[test]
fn gpu_check_runs_groups_in_the_order_asked() -> Result<(), String> {
    // Groups run in the order STEPS gives them (QUICK's puts the comparison
    // before the other precisions' checks); an unknown group is a failure that
    // names the known ones.
    let dir = scratch("gpu_check_order")?;
    let outproj = Path::new(env!("CARGO_BIN_EXE_outproj"));
    let (ok, stdout) = gpu_check(outproj, &dir, &[("STEPS", "compare nonsense")])?;
    assert!(!ok, "{stdout}");
    let order: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let pos = |s: &str| order.iter().position(|&x| x == s);
    assert!(pos("compare") < pos("nonsense"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("nonsense")
            && l.contains("FAIL")
            && l.contains("check-precisions")),
        "{stdout}"
    );
    Ok(())
}

#[test]
fn gpu_check_counts_targets_and_predictions() -> Result<(), String> {
    // compare on the same rows as compare_bench's test: the summary counts the
    // targets and the predictions apart.
    let dir = scratch("gpu_check_compare")?;
    write(&dir.join("bench-cuda-bf16-b1.json"), OURS_BF16)?;
    write(&dir.join("torch-baseline.json"), TORCH_BASELINE)?;
    let outproj = Path::new(env!("CARGO_BIN_EXE_outproj"));
    let (ok, stdout) = gpu_check(outproj, &dir, &[("STEPS", "compare")])?;
    assert!(ok, "{stdout}");
    let want =
        "targets: 3 met, 0 not met, 3 not measured; predictions: 2 hold, 1 refuted, 9 not measured";
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("compare") && l.contains(want)),
        "{stdout}"
    );
    Ok(())
}

#[test]
fn gpu_check_brings_a_vulkan_loader_where_the_machine_has_none() -> Result<(), String> {
    // A machine whose dynamic loader knows no libvulkan.so.1 (an `ldconfig`
    // that lists nothing): the loader comes from the .deb in VULKAN_DEBS,
    // unpacked into a folder put first on LD_LIBRARY_PATH, and the loader is
    // pointed at NVIDIA_ICD, since no manifest of its own folders names
    // NVIDIA. Without a .deb the step says how to get one.
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        println!("skipped: no dpkg-deb to build the test's package with");
        return Ok(());
    }
    let dir = scratch("gpu_check_vulkan")?;
    let pkg = dir.join("pkg");
    let lib = pkg.join("usr/lib/x86_64-linux-gnu");
    std::fs::create_dir_all(pkg.join("DEBIAN")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&lib).map_err(|e| e.to_string())?;
    write(
        &pkg.join("DEBIAN/control"),
        "Package: libvulkan1\nVersion: 9.9\nArchitecture: amd64\n\
         Maintainer: test <test@example.com>\nDescription: a stand-in\n",
    )?;
    write(&lib.join("libvulkan.so.1"), "not a library")?;
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| e.to_string())?;
    let deb = debs.join("libvulkan1_9.9_amd64.deb");
    run(
        "dpkg-deb",
        &[
            "--build",
            &pkg.display().to_string(),
            &deb.display().to_string(),
        ],
    )?;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    let ldconfig = bin.join("ldconfig");
    write(&ldconfig, "#!/bin/sh\nexit 0\n")?;
    let stub = bin.join("outproj");
    write(
        &stub,
        r#"#!/usr/bin/env bash
if [[ $1 == info ]]; then
    echo "first: $(cat "${LD_LIBRARY_PATH%%:*}/libvulkan.so.1")"
    echo "loaders: $LD_LIBRARY_PATH"
    echo "manifest: $VK_DRIVER_FILES"
fi
exit 0
"#,
    )?;
    for f in [&ldconfig, &stub] {
        run("chmod", &["+x", &f.display().to_string()])?;
    }
    let icd = write(&dir.join("nvidia_icd.json"), "{}")?;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let debs = debs.display().to_string();
    let mut env = vec![
        ("STEPS", "none"),
        ("PATH", path.as_str()),
        ("VULKAN_DEBS", debs.as_str()),
        ("NVIDIA_ICD", icd.as_str()),
        ("VK_DRIVER_FILES", ""),
        ("VK_ICD_FILENAMES", ""),
    ];
    let out = dir.join("out");
    let (ok, stdout) = gpu_check(&stub, &out, &env)?;
    assert!(ok, "{stdout}");
    let vulkan = stdout
        .lines()
        .find(|l| l.starts_with("vulkan"))
        .unwrap_or_default();
    assert!(
        vulkan.contains(" ok ") && vulkan.contains("libvulkan1_9.9_amd64.deb"),
        "{stdout}"
    );
    // While the steps ran, the unpacked loader's folder came first on
    // LD_LIBRARY_PATH; it is gone once the script is.
    let info = read(&out.join("info.out"))?;
    assert!(info.contains("first: not a library\n"), "{info}");
    assert!(info.contains(&format!("manifest: {icd}\n")), "{info}");
    let unpacked = info
        .lines()
        .find_map(|l| l.strip_prefix("loaders: "))
        .and_then(|p| p.split(':').next())
        .unwrap_or_default();
    assert!(
        unpacked.ends_with("usr/lib/x86_64-linux-gnu") && !Path::new(unpacked).exists(),
        "{info}"
    );

    // No .deb: skipped, with the way to get one.
    let empty = dir.join("empty").display().to_string();
    env[2] = ("VULKAN_DEBS", empty.as_str());
    let (ok, stdout) = gpu_check(&stub, &dir.join("out2"), &env)?;
    assert!(ok, "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("vulkan")
            && l.contains("skip")
            && l.contains("no libvulkan.so.1")),
        "{stdout}"
    );
    Ok(())
}
