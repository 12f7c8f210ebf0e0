//! virtio-blk request parsing and execution on arbitrary guest memory.
#![no_main]

use std::sync::OnceLock;

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::VirtioBackend;
use libfuzzer_sys::fuzz_target;

fn disk() -> &'static std::path::Path {
    static DISK: OnceLock<std::path::PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("vessel-fuzz-blk-{}", std::process::id()));
        std::fs::write(&path, vec![0x5a; 64 * 1024]).expect("fuzz disk");
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let mem = vessel_fuzz::memory(data);
    let mut queue = vessel_fuzz::queue(0);
    let config =
        BlockConfig { path: disk().to_path_buf(), read_only: data.first().is_some_and(|b| b & 1 == 1), id: None, direct: false };
    let (mut blk, _) = Block::open(&config).expect("open fuzz disk");
    blk.set_acked_features(blk.features());
    blk.process_queue(0, &mut queue, &mem);
});
