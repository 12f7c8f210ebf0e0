//! Guest artifacts: the guest kernel, the initramfs (agent + modules) and
//! container rootfs images.
//!
//! Not built yet. Nothing here pretends to work.
