use attune_models::gguf;
use attune_models::linear::ComputeMode;
use candle_core::{Device, Tensor, D};

#[test]
fn debug_modes() {
    let p = attune_models::default_model_path();
    let chat: Vec<u32> = vec![1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 16891, 1225, 282, 913, 418, 3426, 1106, 47, 2, 198, 1, 520, 9531, 198];
    {
        let m = gguf::load(&p, ComputeMode::F32).unwrap().model;
        let mut ids = chat.clone();
        for _ in 0..4 {
            let l = m.forward(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None).unwrap();
            let n = l.squeeze(0).unwrap().get(ids.len()-1).unwrap().argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
            ids.push(n);
        }
        eprintln!("full: {:?}", &ids[41..]);
    }
    for mode in [ComputeMode::F32] {
        let m = gguf::load(&p, mode).unwrap().model;
        let mut cache = m.new_cache();
        let mut next = m.forward_last(&Tensor::new(chat.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache).unwrap().argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
        let mut out = vec![];
        let t = std::time::Instant::now();
        for _ in 0..12 {
            out.push(next);
            next = m.forward_last(&Tensor::new(&[[next]], &Device::Cpu).unwrap(), &mut cache).unwrap().argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
        }
        eprintln!("{mode:?}: {out:?} {:?}", t.elapsed());
    }
}
