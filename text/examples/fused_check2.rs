use afm_text::generation::ids_tensor;
use afm_text::{DType, Logits, TextModel};
use tch::{Device, Tensor};
fn run(m: &TextModel, fused: bool) -> Vec<Tensor> {
    let d = &m.decoder;
    let prompt: Vec<u32> = (0..20).map(|i| 100 + 37 * i).collect();
    let mut cache = d.new_cache(1);
    let _ = d
        .forward(
            &ids_tensor(&prompt).unwrap(),
            None,
            &mut cache,
            Logits::Last,
        )
        .unwrap();
    let _ = fused;
    (0..4u32)
        .map(|i| {
            d.forward(
                &ids_tensor(&[200 + i]).unwrap(),
                None,
                &mut cache,
                Logits::Last,
            )
            .unwrap()
        })
        .collect()
}
fn main() {
    let _g = tch::no_grad_guard();
    let mut a = TextModel::load(
        std::path::Path::new("assets/models/smollm2-135m-instruct"),
        Device::Cpu,
        DType::F32,
    )
    .unwrap();
    a.decoder.set_fused_decode(false);
    let mut b = TextModel::load(
        std::path::Path::new("/tmp/smol_q41"),
        Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let ra = run(&a, false);
    b.decoder.set_fused_decode(false);
    let rb = run(&b, false);
    b.decoder.set_fused_decode(true);
    let rc = run(&b, true);
    for i in 0..4 {
        let d = |x: &Tensor, y: &Tensor| f64::try_from(x.f_sub(y).unwrap().abs().max()).unwrap();
        println!(
            "dense vs q41-torch {:.3e}  dense vs q41-fused {:.3e}  torch vs fused {:.3e}",
            d(&ra[i], &rb[i]),
            d(&ra[i], &rc[i]),
            d(&rb[i], &rc[i])
        );
    }
}
