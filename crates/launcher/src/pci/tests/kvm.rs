//! The transport on a real /dev/kvm: the kick is an ioeventfd that a vCPU's
//! store to the notify address signals without leaving the kernel, and the
//! call is an irqfd on the vector's GSI that KVM consumes.

use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::*;
use crate::irq::GsiRouter;

fn readable(fd: &EventFd) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// True if an ioeventfd for `fd` is already registered at `addr` (KVM
/// refuses a duplicate with EEXIST; otherwise we undo our probe).
fn ioeventfd_at(vm: &VmFd, fd: &EventFd, addr: u64) -> bool {
    match vm.register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch) {
        Err(e) if e.errno() == libc::EEXIST => true,
        Err(e) => panic!("KVM_IOEVENTFD probe: {e}"),
        Ok(()) => {
            vm.unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch).unwrap();
            false
        }
    }
}

/// True if `fd` is attached as an irqfd to `gsi` (KVM refuses the same
/// eventfd twice with EBUSY).
fn irqfd_on(vm: &VmFd, fd: &EventFd, gsi: u32) -> bool {
    match vm.register_irqfd(fd, gsi) {
        Err(e) if e.errno() == libc::EBUSY => true,
        Err(e) => panic!("KVM_IRQFD probe: {e}"),
        Ok(()) => {
            vm.unregister_irqfd(fd, gsi).unwrap();
            false
        }
    }
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    }
}

/// A vCPU in flat 32-bit protected mode about to run: store a word to
/// `notify`, then `out 0x80, al`.
fn notifying_vcpu(vm: &VmFd, mem: &GuestMemory, notify: u64) -> kvm_ioctls::VcpuFd {
    let code_at = 0x1000u64;
    let mut code = vec![0xb8]; // mov eax, imm32
    code.extend_from_slice(&(notify as u32).to_le_bytes());
    code.extend_from_slice(&[0x66, 0xc7, 0x00, 0x00, 0x00]); // mov word [eax], 0
    code.extend_from_slice(&[0xe6, 0x80]); // out 0x80, al
    code.extend_from_slice(&[0xf4]); // hlt
    mem.write_slice(&code, GuestAddress(code_at)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs = flat_segment(0x8, 0xb);
    for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.ss, &mut sregs.fs, &mut sregs.gs] {
        *s = flat_segment(0x10, 0x3);
    }
    sregs.cr0 |= 1;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = code_at;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    vcpu
}

#[test]
fn kick_is_an_ioeventfd_and_call_an_irqfd_on_real_kvm() {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("skipping: cannot open /dev/kvm: {e}");
            return;
        }
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let mem = guest_mem();
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which
        // outlives the VM in this test.
        unsafe { vm.set_user_memory_region(r) }.unwrap();
    }

    let router = Arc::new(GsiRouter::new(vm.clone()));
    router.install().expect("KVM accepts the default routing table");
    let (pio, mmio) = (Bus::new(), Bus::new());
    let mut host = PciHost::new(&pio, &mmio, vm.clone(), router.clone()).unwrap();
    let dev =
        host.add_virtio(Box::new(FillDevice::new()), &mem, &Runtime::new(ThreadingMode::PerQueue)).unwrap();
    let d = Driver { pio, mmio, slot: 1, bar: layout::PCI_MMIO_START };
    let kick = dev.lock().unwrap().kick(0).unwrap().try_clone().unwrap();
    let notify = d.bar + 0x3000;

    // Placing the BAR registers the queue's ioeventfd.
    assert!(!ioeventfd_at(&vm, &kick, notify));
    d.cfg_write(0x04, 2, 0x6);
    assert!(ioeventfd_at(&vm, &kick, notify), "ioeventfd at the notify address");

    // Unmasking vector 1 attaches its irqfd on its own GSI.
    let (_, _, msix_cap) = d.caps();
    let (gsi, call) = {
        let dev = dev.lock().unwrap();
        (dev.msix().gsi(1).unwrap(), dev.msix().call(1).unwrap().try_clone().unwrap())
    };
    assert!(gsi >= layout::FIRST_MSI_GSI);
    assert!(!irqfd_on(&vm, &call, gsi));
    d.enable_msix(msix_cap);
    assert!(irqfd_on(&vm, &call, gsi), "irqfd attached once the vector is live");

    assert_ne!(d.negotiate(1 << 32) & 8, 0);
    let ring = 0x1_0000;
    d.setup_queue0(ring);
    d.set_status(1 | 2 | 8 | 4);
    assert!(dev.lock().unwrap().is_active());
    // The queue thread goes to sleep on its kick; then the guest offers a
    // buffer and notifies.
    std::thread::sleep(Duration::from_millis(50));
    offer_buffer(&mem, ring, 0, 0x8000);

    // A guest store to the notify address: KVM signals the kick eventfd
    // in the kernel; the next exit to user space is the `out`.
    let mut vcpu = notifying_vcpu(&vm, &mem, notify);
    let mut fell_back = false;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0x80, _)) => break,
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                fell_back = true;
                let data = data.to_vec();
                d.mmio.write(addr, &data);
            }
            Ok(other) => panic!("unexpected vCPU exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    }
    assert!(!fell_back, "the notify store must not exit to user space");
    assert!(wait_used(&mem, ring, 1), "queue thread served the guest's kick");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8000)).unwrap(), FILL);
    let c = dev.lock().unwrap().state().queue(0);
    assert_eq!((c.kicks, c.chains), (1, 1));
    assert_eq!(c.interrupts, 1);
    assert_eq!(c.errors, 0, "the queue thread sleeps in a blocking read on its kick");
    // KVM took the interrupt off the call eventfd (irqfd), so nothing is
    // left for anyone in user space.
    assert!(!readable(&call), "the irqfd consumed the call");

    // Masked: the irqfd is detached and the interrupt waits in the PBA.
    d.bar_write(0x4000 + 16 + 12, 4, 1);
    assert!(!irqfd_on(&vm, &call, gsi));
    offer_buffer(&mem, ring, 1, 0x9000);
    kick.write(1).unwrap();
    assert!(wait_used(&mem, ring, 2));
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.bar_read(0x6000, 8) != 0b10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(d.bar_read(0x6000, 8), 0b10, "pending bit");
    d.bar_write(0x4000 + 16 + 12, 4, 0);
    assert!(irqfd_on(&vm, &call, gsi));

    // The guest moves the BAR: the ioeventfd moves with it.
    d.cfg_write(0x04, 2, 0x4);
    assert!(!ioeventfd_at(&vm, &kick, notify));
    d.cfg_write(0x10, 4, 0xd000_0000);
    d.cfg_write(0x04, 2, 0x6);
    assert!(ioeventfd_at(&vm, &kick, 0xd000_3000));
    assert!(!ioeventfd_at(&vm, &kick, notify));

    // Reset: the queue thread stops.
    let moved = Driver { bar: 0xd000_0000, ..d };
    moved.set_status(0);
    assert!(!dev.lock().unwrap().is_active());
    assert_eq!(moved.status(), 0);
}
