pub fn v() -> usize { core::mem::size_of::<engine::X>() }
