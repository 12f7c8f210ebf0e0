//! A running sandbox's network interfaces: adding one from a network
//! namespace (a NIC hot-plugged on a TAP beside its veth, Kata's tcfilter
//! model), removing it, and the guest's interfaces and routes.

use agent_proto::agent::{
    Empty, Interface, Interfaces, Routes, UpdateInterfaceRequest, UpdateRoutesRequest, VirtioSlotRequest,
};
use tracing::{info_span, warn};

use super::{Sandbox, SandboxError};
use crate::config::NetworkConfig;
use crate::hypervisor::Nic;
use crate::network;
use crate::state::{LockKind, NicRecord};

impl Sandbox {
    /// Adds the veth `network` names to the running sandbox (Kata's
    /// AddInterface): a TAP beside it with the redirects, a NIC hot-plugged
    /// on the TAP, and the veth's name, addresses, MTU and routes given to
    /// the guest's NIC. Returns the interface as the guest has it.
    pub fn add_interface(&mut self, network: &NetworkConfig) -> Result<Interface, SandboxError> {
        let _span = info_span!("add_interface", interface = %network.interface).entered();
        let _lock = self.lock(LockKind::Exclusive)?;
        self.require_vm("add an interface")?;
        if self.state.nics.iter().any(|n| n.name == network.interface) {
            return Err(SandboxError::InterfaceExists { sandbox: self.id().into(), name: network.interface.clone() });
        }
        // The first TAP name no interface uses (of len + 1 names, one is
        // free).
        let taken = |t: &String| self.state.nics.iter().any(|n| &n.tap == t);
        let count = self.state.nics.len();
        let tap = (0..=count).map(network::tap_name).find(|t| !taken(t)).unwrap_or_else(|| network::tap_name(count));
        let plan = network::setup(network, &tap)?;
        let nic = Nic { netns: Some(plan.netns.clone()), tap: tap.clone(), mac: plan.mac };
        let plugged = match self.vm.add_nic(&nic) {
            Ok(plugged) => plugged,
            Err(e) => {
                network::teardown(network, &tap);
                return Err(e.into());
            }
        };
        let mac = network::format_mac(&plugged.mac);
        let configured = (|| -> Result<Interface, SandboxError> {
            if let Some(address) = plugged.bind_address {
                let bind = VirtioSlotRequest { address, bind: true, ..Default::default() };
                self.agent.call("UpdateVirtioSlot", |c, ctx| c.update_virtio_slot(ctx, &bind))?;
            }
            let wanted = Interface { hw_addr: mac.clone(), ..plan.guest_interface.clone() };
            let request = UpdateInterfaceRequest { interface: Some(wanted).into(), ..Default::default() };
            let interface = self.agent.call("UpdateInterface", |c, ctx| c.update_interface(ctx, &request))?;
            if !plan.guest_routes.is_empty() {
                let routes = Routes { routes: plan.guest_routes.clone(), ..Default::default() };
                let request = UpdateRoutesRequest { routes: Some(routes).into(), ..Default::default() };
                self.agent.call("UpdateRoutes", |c, ctx| c.update_routes(ctx, &request))?;
            }
            Ok(interface)
        })();
        let interface = match configured {
            Ok(interface) => interface,
            Err(e) => {
                if let Some(address) = plugged.bind_address {
                    let unbind = VirtioSlotRequest { address, bind: false, ..Default::default() };
                    let _ = self.agent.call("UpdateVirtioSlot", |c, ctx| c.update_virtio_slot(ctx, &unbind));
                }
                if let Err(undo) = self.vm.remove_nic(plugged.handle) {
                    warn!(error = %undo, "rollback: cannot take the NIC out again");
                }
                network::teardown(network, &tap);
                return Err(e);
            }
        };
        self.state.nics.push(NicRecord {
            network: network.clone(),
            tap,
            name: network.interface.clone(),
            mac,
            handle: Some(plugged.handle),
            bind_address: plugged.bind_address,
        });
        self.save()?;
        Ok(interface)
    }

    /// Removes the interface `name` that [`Sandbox::add_interface`] added
    /// (Kata's RemoveInterface): the guest's NIC goes down without its
    /// addresses, the NIC and the TAP go, the veth keeps its own.
    pub fn remove_interface(&mut self, name: &str) -> Result<(), SandboxError> {
        let _span = info_span!("remove_interface", interface = %name).entered();
        let _lock = self.lock(LockKind::Exclusive)?;
        self.require_vm("remove an interface")?;
        let position = self
            .state
            .nics
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| SandboxError::NoSuchInterface { sandbox: self.id().into(), name: name.into() })?;
        let nic = self.state.nics[position].clone();
        let Some(handle) = nic.handle else {
            return Err(SandboxError::BootInterface { sandbox: self.id().into(), name: name.into() });
        };
        let down = Interface { name: nic.name.clone(), hw_addr: nic.mac.clone(), up: false, ..Default::default() };
        let request = UpdateInterfaceRequest { interface: Some(down).into(), ..Default::default() };
        self.agent.call("UpdateInterface", |c, ctx| c.update_interface(ctx, &request))?;
        if let Some(address) = nic.bind_address {
            let unbind = VirtioSlotRequest { address, bind: false, ..Default::default() };
            self.agent.call("UpdateVirtioSlot", |c, ctx| c.update_virtio_slot(ctx, &unbind))?;
        }
        self.vm.remove_nic(handle)?;
        network::teardown(&nic.network, &nic.tap);
        self.state.nics.remove(position);
        self.save()
    }

    /// The guest's network interfaces (Kata's ListInterfaces).
    pub fn list_interfaces(&mut self) -> Result<Interfaces, SandboxError> {
        let _lock = self.lock(LockKind::Shared)?;
        Ok(self.agent.call("ListInterfaces", |c, ctx| c.list_interfaces(ctx, &Empty::new()))?)
    }

    /// The guest's routes (Kata's ListRoutes).
    pub fn list_routes(&mut self) -> Result<Routes, SandboxError> {
        let _lock = self.lock(LockKind::Shared)?;
        Ok(self.agent.call("ListRoutes", |c, ctx| c.list_routes(ctx, &Empty::new()))?)
    }

    /// Replaces the routes on every device `routes` names (Kata's
    /// UpdateRoutes); returns the guest's routes after.
    pub fn update_routes(&mut self, routes: Routes) -> Result<Routes, SandboxError> {
        let _lock = self.lock(LockKind::Exclusive)?;
        let request = UpdateRoutesRequest { routes: Some(routes).into(), ..Default::default() };
        Ok(self.agent.call("UpdateRoutes", |c, ctx| c.update_routes(ctx, &request))?)
    }
}
