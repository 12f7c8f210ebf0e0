//! A device's backend made from its configuration, with the counters that
//! stats report under the device's name. Adding a device type means one
//! arm here.

use std::sync::Arc;

use devices::virtio::block::{Block, BlockError};
use devices::virtio::net::{Net, NetError};
use devices::virtio::rng::Rng;
use devices::virtio::vhost_user_frontend::{FrontendError, VhostUserFrontend};
use devices::virtio::vsock::{Vsock, VsockError};
use devices::virtio::{CounterSet, VirtioBackend};

use crate::config::DeviceConfig;

/// A device's counters, under the name stats report them.
pub(crate) type NamedCounters = (String, Arc<dyn CounterSet>);

/// Why a device's backend could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The disk could not be opened.
    #[error("cannot create the virtio-blk device")]
    Block(#[from] BlockError),
    /// The TAP could not be opened.
    #[error("cannot create the virtio-net device")]
    Net(#[from] NetError),
    /// The vsock device or its host socket could not be made.
    #[error("cannot create the virtio-vsock device")]
    Vsock(#[from] VsockError),
    /// The vhost-user daemon could not be reached or refused the device.
    #[error("cannot create the vhost-user device")]
    VhostUser(#[from] FrontendError),
}

/// Makes the backend `config` describes.
pub(crate) fn create(config: &DeviceConfig) -> Result<(Box<dyn VirtioBackend>, NamedCounters), BackendError> {
    fn named<B: VirtioBackend + 'static, C: CounterSet + 'static>(
        name: String,
        (backend, counters): (B, Arc<C>),
    ) -> (Box<dyn VirtioBackend>, NamedCounters) {
        (Box::new(backend), (name, counters))
    }
    Ok(match config {
        DeviceConfig::Rng => named("rng".into(), Rng::new()),
        DeviceConfig::Block(block) => named(format!("blk {}", block.path.display()), Block::open(block)?),
        DeviceConfig::Net(net) => named(format!("net {}", net.tap), Net::new(net)?),
        DeviceConfig::Vsock(vsock) => named(format!("vsock cid {}", vsock.guest_cid), Vsock::new(vsock)?),
        DeviceConfig::VhostUser(vu) => {
            named(format!("vhost-user {}", vu.socket.display()), VhostUserFrontend::connect(vu)?)
        }
    })
}
