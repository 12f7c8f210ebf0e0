//! The CPUID table each vCPU sees, derived from what KVM supports
//! (KVM_GET_SUPPORTED_CPUID): the topology leaves describe `vcpus` cores of
//! one thread each in one package, the hypervisor leaf is present, and
//! features the VMM cannot back are removed. Pure: no KVM calls.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_POWER: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

// Leaf 1.
const ECX_MONITOR: u32 = 1 << 3;
const ECX_VMX: u32 = 1 << 5;
const ECX_PDCM: u32 = 1 << 15;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
// Leaf 0x8000_0001.
const ECX_SVM: u32 = 1 << 2;

/// Topology level types of leaves 0xb and 0x1f.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// KVM's hypervisor signature, "KVMKVMKVM\0\0\0": Linux looks for it to use
/// kvm-clock and the other paravirtual features KVM offers.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Bits needed to number `n` items (0 for 1).
fn id_bits(n: u8) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

/// Builds vCPU `vcpu`'s table (its APIC ID is `vcpu`) out of KVM's.
pub fn vcpu_cpuid(supported: &[kvm_cpuid_entry2], vcpu: u8, vcpus: u8) -> Vec<kvm_cpuid_entry2> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.to_vec();
    let apic_id = u32::from(vcpu);
    let count = u32::from(vcpus.max(1));
    let max_basic = entries.iter().find(|e| e.function == LEAF_VENDOR).map_or(0, |e| e.eax);

    // Leaves 0xb and 0x1f need one entry per level; KVM may report them
    // empty. Rebuild them whole.
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        if max_basic >= leaf {
            entries.retain(|e| e.function != leaf);
            entries.extend((0..3).map(|index| topology_entry(leaf, index, apic_id, vcpus)));
        }
    }
    if !entries.iter().any(|e| e.function == LEAF_HYPERVISOR) {
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: LEAF_HYPERVISOR + 1,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }

    for e in &mut entries {
        match e.function {
            LEAF_FEATURES => {
                // EBX: initial APIC ID, logical processors per package,
                // CLFLUSH line size in 8-byte units.
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
                e.ecx &= !(ECX_MONITOR | ECX_VMX | ECX_PDCM);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Cores per package - 1; each cache is private to a core
                // except the last level, shared by the package.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3ff) | (sharing << 14) | ((count - 1) << 26);
            }
            LEAF_POWER | LEAF_PMU => {
                // No thermal/power management, no virtual PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_EXT_FEATURES => e.ecx &= !ECX_SVM,
            LEAF_AMD_SIZES => {
                // Number of cores - 1 and the APIC ID bits they need.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(vcpus) << 12) | (count - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // core ID, one thread per core
                e.ecx = 0; // node 0, one node
            }
            _ => {}
        }
    }
    entries
}

fn topology_entry(leaf: u32, index: u32, apic_id: u32, vcpus: u8) -> kvm_cpuid_entry2 {
    let (eax, ebx, ecx) = match index {
        // One thread per core: the SMT level adds no APIC ID bits.
        0 => (0, 1, (LEVEL_SMT << 8) | index),
        1 => (id_bits(vcpus), u32::from(vcpus.max(1)), (LEVEL_CORE << 8) | index),
        // An invalid level ends the enumeration.
        _ => (0, 0, index),
    };
    kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    }
}

/// The feature registers a restore compares: (leaf, subleaf, register
/// name, register index in eax/ebx/ecx/edx order, bits the CPU changes at
/// run time and that say nothing about the host). Leaf 1's OSXSAVE and
/// APIC and leaf 7's OSPKE follow CR4 and the APIC base MSR.
const FEATURE_REGISTERS: [(u32, u32, &str, usize, u32); 8] = [
    (LEAF_FEATURES, 0, "ECX", 2, (1 << 27)),
    (LEAF_FEATURES, 0, "EDX", 3, (1 << 9)),
    (0x7, 0, "EBX", 1, 0),
    (0x7, 0, "ECX", 2, (1 << 4)),
    (0x7, 0, "EDX", 3, 0),
    (0xd, 1, "EAX", 0, 0),
    (LEAF_EXT_FEATURES, 0, "ECX", 2, 0),
    (LEAF_EXT_FEATURES, 0, "EDX", 3, 0),
];

/// Which feature bits a `saved` CPUID table has that a table made on this
/// host (`here`, from [`vcpu_cpuid`]) lacks, as text naming the leaf,
/// register and bits; None when `here` has them all. A guest restored
/// onto a host without a feature it was using would fault on it.
pub fn missing_features(saved: &[kvm_cpuid_entry2], here: &[kvm_cpuid_entry2]) -> Option<String> {
    let find = |table: &[kvm_cpuid_entry2], leaf: u32, sub: u32| {
        table.iter().find(|e| e.function == leaf && e.index == sub).map(|e| [e.eax, e.ebx, e.ecx, e.edx])
    };
    let mut missing = Vec::new();
    for (leaf, sub, name, reg, dynamic) in FEATURE_REGISTERS {
        let Some(saved) = find(saved, leaf, sub) else { continue };
        let here = find(here, leaf, sub).unwrap_or_default();
        let lacking = saved[reg] & !here[reg] & !dynamic;
        if lacking != 0 {
            missing.push(format!("CPUID leaf {leaf:#x}.{sub} {name} bits {lacking:#x}"));
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65), // max leaf 0x10, AuthenticAMD
            entry(1, 0x00a0_0f11, 0x00ff_0800, ECX_MONITOR | ECX_VMX | 0x1, EDX_HTT | 0x1),
            entry(6, 0x4, 0, 0x1, 0),
            entry(0xa, 0x0704_3001, 0, 0, 0),
            entry(0xb, 0, 0, 0, 0),
            entry(0x8000_0001, 0, 0, ECX_SVM | 0x1, 0),
        ]
    }

    #[test]
    fn leaf_1_carries_apic_id_count_and_hypervisor_bit() {
        let t = vcpu_cpuid(&supported(), 3, 4);
        let l1 = find(&t, 1, 0);
        assert_eq!(l1.ebx, (3 << 24) | (4 << 16) | (8 << 8));
        assert_eq!(l1.ecx, ECX_HYPERVISOR | 0x1, "MONITOR and VMX removed");
        assert_eq!(l1.edx, EDX_HTT | 0x1);
        let single = find(&vcpu_cpuid(&supported(), 0, 1), 1, 0);
        assert_eq!(single.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_describes_cores_and_x2apic_id() {
        let t = vcpu_cpuid(&supported(), 2, 3);
        assert_eq!(t.iter().filter(|e| e.function == 0xb).count(), 3);
        let smt = find(&t, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&t, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = find(&t, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx >> 8), (0, 0, 0));
        assert_eq!(core.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        // Leaf 0x1f is beyond this CPU's max basic leaf: not invented.
        assert!(!t.iter().any(|e| e.function == 0x1f));
    }

    #[test]
    fn unsupported_features_are_removed_and_hypervisor_leaf_added() {
        let t = vcpu_cpuid(&supported(), 0, 1);
        assert_eq!(find(&t, 6, 0).ecx, 0);
        assert_eq!(find(&t, 0xa, 0).eax, 0);
        assert_eq!(find(&t, 0x8000_0001, 0).ecx, 0x1);
        let hv = find(&t, 0x4000_0000, 0);
        assert_eq!([hv.ebx, hv.ecx, hv.edx], KVM_SIGNATURE);
        let sig: Vec<u8> = KVM_SIGNATURE.iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([id_bits(1), id_bits(2), id_bits(3), id_bits(4), id_bits(5)], [0, 1, 2, 2, 3]);
    }

    #[test]
    fn features_a_snapshot_needs_that_the_host_lacks_are_named() {
        let entry = |function, index, ebx, ecx| kvm_cpuid_entry2 { function, index, ebx, ecx, ..Default::default() };
        let here = vec![entry(1, 0, 0, 0x8000_0001), entry(7, 0, 0b1010, 0)];
        let saved = vec![entry(1, 0, 0, 0x8800_0001), entry(7, 0, 0b1110, 0)];
        // OSXSAVE (leaf 1 ECX bit 27) follows CR4 and is not a host feature.
        assert_eq!(missing_features(&saved, &here).unwrap(), "CPUID leaf 0x7.0 EBX bits 0x4");
        assert_eq!(missing_features(&here, &here), None);
        assert_eq!(missing_features(&here, &saved), None);
    }
}
