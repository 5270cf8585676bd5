//! CUDA: the decoders on a GPU give the CPU's logits, and concurrent PT-MoE tracks sharing one
//! GPU run on streams of their own (issue 7: "on CUDA on separate devices or streams").
//!
//! The GPU tests are `#[ignore]`d, since CI has no GPU; on a GPU machine run
//! `cargo test --release -p afm-text --test cuda -- --include-ignored`.
//! One test runs everywhere: without a GPU, asking for a CUDA stream is an error, not an abort.

mod common;

use afm_text::cuda_stream::CudaStream;
use afm_text::decoder::{weight_shapes, Decoder};
use afm_text::device::cuda_available;
use afm_text::generation::generate_lm;
use afm_text::presets::preset;
use afm_text::ptmoe::ptmoe_weight_shapes;
use afm_text::ptmoe_config::{ptmoe_preset, PtMoeConfig};
use afm_text::sampling::SamplingConfig;
use afm_text::weights::WeightMap;
use afm_text::{GenerateOptions, Logits, PtMoe, TrackExec};
use common::{ids, max_abs_diff, sequence};
use tch::{Device, Kind, Tensor};

const GPU: Device = Device::Cuda(0);

/// |a − b| within `tol` times the reference's scale (fp32 kernels differ between devices in
/// summation order only).
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let got = got.to_device(Device::Cpu);
    let diff = max_abs_diff(&got, want);
    let scale = want.abs().max().double_value(&[]).max(1.0);
    eprintln!("{what}: max |Δ| = {diff:e} (scale {scale:.2})");
    assert!(
        diff <= tol * scale,
        "{what}: max |Δ| = {diff} > {tol} × {scale}"
    );
}

/// A PT-MoE preset's config, seeded random weights on the CPU, and the model built on them.
fn ptmoe_on_cpu(name: &str, seed: i64) -> (PtMoeConfig, WeightMap, PtMoe) {
    let cfg = ptmoe_preset(name).unwrap();
    let shapes = ptmoe_weight_shapes(&cfg);
    let w = WeightMap::random(&shapes, seed, 0.02, Device::Cpu, Kind::Float).unwrap();
    let cpu = PtMoe::new(&cfg, &w, &[]).unwrap();
    (cfg, w, cpu)
}

#[test]
fn a_stream_without_a_gpu_is_an_error() {
    if cuda_available() {
        // On a GPU the ignored tests below exercise streams; here only check one is given.
        let s = CudaStream::from_pool(0).unwrap();
        assert_ne!(s.id(), 0, "a pool stream is not the default stream");
        return;
    }
    let err = CudaStream::from_pool(0).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(err.starts_with("CUDA stream:"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dense_decoders_on_the_gpu_match_the_cpu() {
    let _g = tch::no_grad_guard();
    assert!(cuda_available(), "no CUDA device");
    for name in ["tiny-dense", "tiny-two-segment"] {
        let cfg = preset(name).unwrap();
        let w = WeightMap::random(&weight_shapes(&cfg), 3, 0.2, Device::Cpu, Kind::Float).unwrap();
        let cpu = Decoder::new(&cfg, &w).unwrap();
        let gpu = Decoder::new(&cfg, &w.on_device(GPU)).unwrap();
        let seq = sequence(40, 1, cfg.vocab_size as i64);
        let mut c = cpu.new_cache(1);
        let want = cpu.forward(&ids(&seq), None, &mut c, Logits::All).unwrap();
        let mut c = gpu.new_cache(1);
        let full = gpu.forward(&ids(&seq), None, &mut c, Logits::All).unwrap();
        assert_close(&format!("{name}: full forward"), &full, &want, 1e-4);
        // Prompt then token by token through the GPU cache, with a snapshot rolled back.
        let mut c = gpu.new_cache(1);
        let mut parts = vec![gpu
            .forward(&ids(&seq[..30]), None, &mut c, Logits::All)
            .unwrap()];
        let snap = c.snapshot();
        let _ = gpu
            .forward(&ids(&[1, 2, 3]), None, &mut c, Logits::All)
            .unwrap();
        c.rollback(&snap).unwrap();
        for t in &seq[30..] {
            parts.push(gpu.forward(&ids(&[*t]), None, &mut c, Logits::All).unwrap());
        }
        let inc = Tensor::cat(&parts, 1);
        assert_close(
            &format!("{name}: incremental + rollback"),
            &inc,
            &want,
            1e-4,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn ptmoe_tracks_on_one_gpu_run_on_their_own_streams_and_match_the_cpu() {
    let _g = tch::no_grad_guard();
    assert!(cuda_available(), "no CUDA device");
    let (cfg, w, cpu) = ptmoe_on_cpu("tiny-ptmoe-3track", 7);
    let mut gpu = PtMoe::new(&cfg, &w.on_device(GPU), &[]).unwrap();
    let win = cfg.sliding_window;
    let seq = sequence(3 * win + 5, 1, cfg.vocab_size as i64);
    let mut c = cpu.new_cache(1);
    let want = cpu.forward(&ids(&seq), None, &mut c, Logits::All).unwrap();

    assert_eq!(gpu.exec(), TrackExec::Concurrent);
    let mut c = gpu.new_cache(1);
    let full = gpu.forward(&ids(&seq), None, &mut c, Logits::All).unwrap();
    assert_close(
        "concurrent tracks on the GPU, full forward",
        &full,
        &want,
        1e-4,
    );
    for block in &gpu.blocks {
        let mut streams: Vec<i64> = block
            .iter()
            .map(|t| {
                t.cuda_stream()
                    .expect("a concurrent GPU track has a stream")
                    .id()
            })
            .collect();
        assert!(
            streams.iter().all(|&id| id != 0),
            "default stream used: {streams:?}"
        );
        streams.sort();
        streams.dedup();
        assert_eq!(
            streams.len(),
            block.len(),
            "tracks of a block share a stream"
        );
    }
    // The rings wrap: prompt of the window + 3, a chunk across it, then token by token.
    let mut c = gpu.new_cache(1);
    let mut parts = Vec::new();
    let mut at = 0;
    for n in [win + 3, 2 * win - 1] {
        parts.push(
            gpu.forward(&ids(&seq[at..at + n]), None, &mut c, Logits::All)
                .unwrap(),
        );
        at += n;
    }
    for t in &seq[at..] {
        parts.push(gpu.forward(&ids(&[*t]), None, &mut c, Logits::All).unwrap());
    }
    assert_close(
        "GPU incremental, rings wrapped",
        &Tensor::cat(&parts, 1),
        &want,
        1e-4,
    );

    gpu.set_exec(TrackExec::Sequential);
    let mut c = gpu.new_cache(1);
    let seqv = gpu.forward(&ids(&seq), None, &mut c, Logits::All).unwrap();
    assert_close("sequential tracks on the GPU", &seqv, &want, 1e-4);

    // Greedy generation: the same tokens on both devices.
    gpu.set_exec(TrackExec::Concurrent);
    let opts = GenerateOptions {
        max_new_tokens: 24,
        sampling: SamplingConfig::greedy(),
        stop_strings: Vec::new(),
        stop_on_eos: false,
    };
    let prompt: Vec<u32> = seq[..20].iter().map(|&t| t as u32).collect();
    let a = generate_lm(&cpu, None, &prompt, &opts, &mut |_| {}).unwrap();
    let b = generate_lm(&gpu, None, &prompt, &opts, &mut |_| {}).unwrap();
    assert_eq!(a.tokens, b.tokens);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn ptmoe_tracks_split_between_cpu_and_gpu_match_the_cpu() {
    let _g = tch::no_grad_guard();
    assert!(cuda_available(), "no CUDA device");
    let (cfg, w, cpu) = ptmoe_on_cpu("tiny-ptmoe", 5);
    let seq = sequence(2 * cfg.sliding_window + 3, 2, cfg.vocab_size as i64);
    let mut c = cpu.new_cache(1);
    let want = cpu.forward(&ids(&seq), None, &mut c, Logits::All).unwrap();
    // The main model (embedding, head) on the CPU or the GPU; tracks on either, in both orders.
    for (main, tracks) in [
        (Device::Cpu, vec![Device::Cpu, GPU]),
        (Device::Cpu, vec![GPU, Device::Cpu]),
        (Device::Cpu, vec![GPU, GPU]),
        (GPU, vec![Device::Cpu, GPU]),
    ] {
        let split = PtMoe::new(&cfg, &w.on_device(main), &tracks).unwrap();
        let devices: Vec<Device> = split.blocks[0].iter().map(|t| t.device()).collect();
        assert_eq!(devices, tracks);
        let mut c = split.new_cache(1);
        let mut parts = vec![split
            .forward(&ids(&seq[..10]), None, &mut c, Logits::All)
            .unwrap()];
        for t in &seq[10..] {
            parts.push(
                split
                    .forward(&ids(&[*t]), None, &mut c, Logits::All)
                    .unwrap(),
            );
        }
        let what = format!("main {main:?}, tracks {tracks:?}, incremental");
        assert_close(&what, &Tensor::cat(&parts, 1), &want, 1e-4);
        for (t, d) in split.blocks[0].iter().zip(&tracks) {
            assert_eq!(
                t.cuda_stream().is_some(),
                *d == GPU,
                "{what}: stream of a {d:?} track"
            );
        }
    }
}
