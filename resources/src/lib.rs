//! Guest artifacts: the guest kernel, its modules, and initramfs images.
//!
//! - [`kernel`]: the distribution's cloud kernel package, fetched with the
//!   system package manager and cached by package version, or a user's own
//!   kernel file.
//! - [`modules`]: the kernel modules a guest needs, with their dependencies,
//!   in load order; built-in drivers are skipped.
//! - [`initramfs`]: a newc cpio writer.
//! - [`test_image`]: initramfs images for the tier-3 tests (busybox, modules
//!   and a test script), cached by content.
//! - [`rootfs`]: container root filesystems as ext4 images from a directory
//!   (`mkfs.ext4 -d`), and a demo busybox tree.
//! - [`progress`]: a progress bar on stderr for the long steps.
//! - [`oci`]: unpacking an OCI image layout (skopeo/umoci output) into a
//!   directory, layer by layer with whiteouts, digests verified, sizes
//!   capped; the layers' owners and modes go into the ext4 image.
//! - [`guest_image`]: the sandbox guest's boot files: the kernel and an
//!   initramfs with the agent as `/init` and the modules it loads (listed
//!   in `modules.load`, a contract with the agent), cached by content.

pub mod cache;
mod command;
mod elf;
pub mod guest_image;
pub mod initramfs;
pub mod kernel;
pub mod modules;
pub mod oci;
pub mod progress;
pub mod rootfs;
pub mod test_image;

pub use command::CommandError;
