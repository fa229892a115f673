use attune_models::gguf;
use attune_models::linear::ComputeMode;
use candle_core::{Device, Tensor, D};

#[test]
fn debug_modes() {
    let p = attune_models::default_model_path();
    let chat: Vec<u32> = vec![1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 16891, 1225, 282, 913, 418, 3426, 1106, 47, 2, 198, 1, 520, 9531, 198];
    let mode = match std::env::var("M").as_deref() { Ok("q") => ComputeMode::Quantized, Ok("f") => ComputeMode::F32, _ => ComputeMode::Auto };
    let n: usize = std::env::var("N").ok().and_then(|s| s.parse().ok()).unwrap_or(32);
    let m = gguf::load(&p, mode).unwrap().model;
    let mut cache = m.new_cache();
    let t = std::time::Instant::now();
    let mut next = m.forward_last(&Tensor::new(chat.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache).unwrap().argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
    eprintln!("prefill {:?}", t.elapsed());
    let t = std::time::Instant::now();
    for _ in 0..n {
        next = m.forward_last(&Tensor::new(&[[next]], &Device::Cpu).unwrap(), &mut cache).unwrap().argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
    }
    eprintln!("{mode:?}: {:?}/tok", t.elapsed() / n as u32);
}
