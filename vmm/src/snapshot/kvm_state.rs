//! The state KVM keeps for a vCPU and for the VM, read out of KVM and put
//! back. Each KVM structure is kept as its raw bytes (the kernel's ABI, the
//! same on every x86-64 host), checked for its exact size when read back:
//! a snapshot is untrusted input, and a short field must be refused, not
//! zero-filled.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Why KVM state could not be read or put back.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A saved structure has the wrong size.
    #[error("the saved {what} is {got} bytes long; KVM's structure is {want}")]
    Size {
        /// Which structure.
        what: &'static str,
        /// Its length in the snapshot.
        got: usize,
        /// The length it must have.
        want: usize,
    },
    /// KVM took only part of the saved MSRs.
    #[error("KVM refused MSR {index:#x} ({accepted} of {total} restored): this host's KVM does not have it")]
    MsrRefused {
        /// The first MSR refused.
        index: u32,
        /// How many were set before it.
        accepted: usize,
        /// How many were saved.
        total: usize,
    },
    /// A list was too long for KVM's structure.
    #[error("too many {0} entries")]
    TooMany(&'static str),
    /// The interrupt controllers are not the master PIC, the slave PIC and
    /// the IOAPIC, in that order.
    #[error("the saved interrupt controllers are {0:?}; want the PICs and the IOAPIC (0, 1, 2)")]
    Irqchips(Vec<u32>),
}

/// A KVM structure's bytes.
fn bytes<T: IntoBytes + Immutable>(value: &T) -> Vec<u8> {
    value.as_bytes().to_vec()
}

/// A KVM structure from its saved bytes, which must be exactly its size.
fn from_bytes<T: FromBytes>(what: &'static str, saved: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(saved).map_err(|_| StateError::Size { what, got: saved.len(), want: std::mem::size_of::<T>() })
}

/// A list of KVM entries from their saved bytes.
fn entries<T: FromBytes + Immutable>(what: &'static str, saved: &[Vec<u8>]) -> Result<Vec<T>, StateError> {
    saved.iter().map(|b| from_bytes::<T>(what, b)).collect()
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Kvm(what, e)
}

/// One vCPU as KVM holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// The CPUID table the vCPU was given (kvm_cpuid_entry2 each).
    pub cpuid: Vec<Vec<u8>>,
    /// Model-specific registers (kvm_msr_entry each).
    pub msrs: Vec<Vec<u8>>,
    /// kvm_regs.
    pub regs: Vec<u8>,
    /// kvm_sregs.
    pub sregs: Vec<u8>,
    /// kvm_xsave: the FPU, SSE and AVX state. 4 KiB holds every component
    /// KVM gives a guest unless the VMM asked for AMX's, which vessel
    /// never does.
    pub xsave: Vec<u8>,
    /// kvm_xcrs.
    pub xcrs: Vec<u8>,
    /// kvm_debugregs.
    pub debug_regs: Vec<u8>,
    /// kvm_lapic_state.
    pub lapic: Vec<u8>,
    /// kvm_mp_state.
    pub mp_state: Vec<u8>,
    /// kvm_vcpu_events: pending exceptions, interrupts, NMIs, SMM.
    pub events: Vec<u8>,
}

impl VcpuState {
    /// Reads vCPU `fd`'s state. The vCPU must be out of KVM_RUN, and must
    /// have completed its last exit (see `vcpu::Vcpu::complete_exit`).
    /// `msr_indices` are the MSRs KVM can save (KVM_GET_MSR_INDEX_LIST);
    /// those this vCPU cannot read are left out.
    pub fn capture(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        let cpuid = fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(kvm("KVM_GET_CPUID2"))?;
        Ok(Self {
            cpuid: cpuid.as_slice().iter().map(bytes).collect(),
            msrs: read_msrs(fd, msr_indices)?.iter().map(bytes).collect(),
            regs: bytes(&fd.get_regs().map_err(kvm("KVM_GET_REGS"))?),
            sregs: bytes(&fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?),
            xsave: bytes(&fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?),
            xcrs: bytes(&fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?),
            debug_regs: bytes(&fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?),
            lapic: bytes(&fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?),
            mp_state: bytes(&fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?),
            events: bytes(&fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?),
        })
    }

    /// The CPUID entries, checked.
    pub fn cpuid_entries(&self) -> Result<Vec<kvm_cpuid_entry2>, StateError> {
        entries("CPUID entry", &self.cpuid)
    }

    /// Checks every field's size, without KVM: a snapshot with a field of
    /// the wrong size is refused before any VM is made.
    pub fn check(&self) -> Result<(), StateError> {
        self.cpuid_entries()?;
        entries::<kvm_msr_entry>("MSR entry", &self.msrs)?;
        from_bytes::<kvm_regs>("kvm_regs", &self.regs)?;
        from_bytes::<kvm_sregs>("kvm_sregs", &self.sregs)?;
        from_bytes::<kvm_xsave>("kvm_xsave", &self.xsave)?;
        from_bytes::<kvm_xcrs>("kvm_xcrs", &self.xcrs)?;
        from_bytes::<kvm_debugregs>("kvm_debugregs", &self.debug_regs)?;
        from_bytes::<kvm_lapic_state>("kvm_lapic_state", &self.lapic)?;
        from_bytes::<kvm_mp_state>("kvm_mp_state", &self.mp_state)?;
        from_bytes::<kvm_vcpu_events>("kvm_vcpu_events", &self.events)?;
        Ok(())
    }

    /// Puts the state into a new vCPU, in the order KVM needs: CPUID
    /// first (it decides which MSRs and XSAVE components exist), the
    /// special registers before the local APIC (the APIC base lives in
    /// them), MSRs after both, pending events last.
    pub fn apply(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid_entries()?).map_err(|_| StateError::TooMany("CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        fd.set_mp_state(from_bytes("kvm_mp_state", &self.mp_state)?).map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&from_bytes("kvm_regs", &self.regs)?).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&from_bytes("kvm_sregs", &self.sregs)?).map_err(kvm("KVM_SET_SREGS"))?;
        let xsave: kvm_xsave = from_bytes("kvm_xsave", &self.xsave)?;
        // SAFETY: `xsave` is a whole 4 KiB kvm_xsave, the legacy size
        // KVM_SET_XSAVE reads, and this VMM never enables the dynamic
        // (AMX) components that would need a larger buffer.
        unsafe { fd.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&from_bytes("kvm_xcrs", &self.xcrs)?).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&from_bytes("kvm_debugregs", &self.debug_regs)?).map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&from_bytes("kvm_lapic_state", &self.lapic)?).map_err(kvm("KVM_SET_LAPIC"))?;
        let msrs: Vec<kvm_msr_entry> = entries("MSR entry", &self.msrs)?;
        let list = Msrs::from_entries(&msrs).map_err(|_| StateError::TooMany("MSR"))?;
        let accepted = fd.set_msrs(&list).map_err(kvm("KVM_SET_MSRS"))?;
        if accepted != msrs.len() {
            return Err(StateError::MsrRefused { index: msrs[accepted].index, accepted, total: msrs.len() });
        }
        fd.set_vcpu_events(&from_bytes("kvm_vcpu_events", &self.events)?).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads every MSR of `indices` the vCPU can read. KVM_GET_MSRS stops at
/// the first MSR it cannot read; that one is skipped and the rest asked
/// again.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let asked: Vec<kvm_msr_entry> =
            rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut list = Msrs::from_entries(&asked).map_err(|_| StateError::TooMany("MSR"))?;
        let read = fd.get_msrs(&mut list).map_err(kvm("KVM_GET_MSRS"))?;
        saved.extend_from_slice(&list.as_slice()[..read.min(asked.len())]);
        // Skip the MSR that stopped the read.
        rest = rest.get(read + 1..).unwrap_or_default();
    }
    Ok(saved)
}

/// The VM-wide state: the interrupt controllers, the PIT, the clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// kvm_irqchip of the master PIC, the slave PIC and the IOAPIC.
    pub irqchips: Vec<Vec<u8>>,
    /// kvm_pit_state2.
    pub pit: Vec<u8>,
    /// kvm_clock_data: the guest's kvmclock.
    pub clock: Vec<u8>,
}

const IRQCHIPS: [u32; 3] = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC];

impl VmState {
    /// Reads the VM's state (its vCPUs paused).
    pub fn capture(vm: &VmFd) -> Result<Self, StateError> {
        let mut irqchips = Vec::with_capacity(IRQCHIPS.len());
        for chip_id in IRQCHIPS {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(bytes(&chip));
        }
        Ok(Self {
            irqchips,
            pit: bytes(&vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?),
            clock: bytes(&vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?),
        })
    }

    /// Checks every field's size, and that the three chips are there in
    /// order.
    pub fn check(&self) -> Result<(), StateError> {
        self.chips()?;
        from_bytes::<kvm_pit_state2>("kvm_pit_state2", &self.pit)?;
        from_bytes::<kvm_clock_data>("kvm_clock_data", &self.clock)?;
        Ok(())
    }

    fn chips(&self) -> Result<Vec<kvm_irqchip>, StateError> {
        let chips: Vec<kvm_irqchip> = entries("kvm_irqchip", &self.irqchips)?;
        let ids: Vec<u32> = chips.iter().map(|c| c.chip_id).collect();
        if ids != IRQCHIPS {
            return Err(StateError::Irqchips(ids));
        }
        Ok(chips)
    }

    /// Puts the state into a new VM whose irqchip and PIT exist.
    pub fn apply(&self, vm: &VmFd) -> Result<(), StateError> {
        for chip in self.chips()? {
            vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&from_bytes("kvm_pit_state2", &self.pit)?).map_err(kvm("KVM_SET_PIT2"))?;
        let mut clock: kvm_clock_data = from_bytes("kvm_clock_data", &self.clock)?;
        // No flags: the guest's clock goes on from where it was paused
        // (KVM_CLOCK_REALTIME would jump it by the time since), and
        // TSC_STABLE is KVM's to report. A sandbox guest's wall clock is
        // set again through its agent after a restore.
        clock.flags = 0;
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_of_the_wrong_size_is_refused_by_name() {
        let state = VmState { irqchips: vec![vec![0; 520]; 3], pit: vec![0; 112], clock: vec![0; 48] };
        let err = state.check().unwrap_err().to_string();
        assert!(err.contains("[0, 0, 0]"), "{err}");
        let mut chips = Vec::new();
        for chip_id in IRQCHIPS {
            chips.push(bytes(&kvm_irqchip { chip_id, ..Default::default() }));
        }
        let state = VmState { irqchips: chips, pit: vec![0; 3], clock: vec![0; 48] };
        let err = state.check().unwrap_err().to_string();
        assert_eq!(err, "the saved kvm_pit_state2 is 3 bytes long; KVM's structure is 112");
    }
}
