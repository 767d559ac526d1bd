//! COM1: a 16550A UART (`vm-superio`'s `Serial`) at port 0x3f8, IRQ 4.
//!
//! Its interrupt line is an eventfd that KVM holds as an irqfd on GSI 4
//! (IOAPIC pin 4), so raising it costs one `write` and no lock. Output goes
//! to the launcher's stdout; input comes from the launcher's stdin through
//! [`StdinPump`] when the serial port is the interactive console.

use kickvm_virtio::seccomp::{self, SeccompMode};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The UART's interrupt line: one write to the irqfd's eventfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// COM1 on the port I/O bus.
pub struct SerialPort {
    uart: Serial<IrqLine, vm_superio::serial::NoEvents, SerialOut>,
    /// Output errors are reported once per VM (e.g. stdout closed), then
    /// ignored: the guest must not stall because nobody reads its console.
    /// Across VMs (a guest rebooting in a loop) the report is throttled.
    out_failed: bool,
}

impl SerialPort {
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        SerialPort { uart: Serial::new(IrqLine(irq), out), out_failed: false }
    }

    /// Queues `input` for the guest; returns how much fitted in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
        // Wider accesses: only the first byte is a register.
        for b in data.iter_mut().skip(1) {
            *b = 0;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) else { return };
        if let Err(e) = self.uart.write(off, b) {
            if !std::mem::replace(&mut self.out_failed, true) {
                kickvm_virtio::warn_limited!(
                    crate::throttles::SERIAL_OUTPUT,
                    "serial output failed, dropping further output errors of this boot: {e:?}"
                );
            }
        }
    }
}

/// Something that accepts console input bytes.
pub trait InputSink: Send {
    /// Takes some of `input`; returns how many bytes were taken (0 = full).
    fn push(&mut self, input: &[u8]) -> usize;
}

impl InputSink for SerialPort {
    fn push(&mut self, input: &[u8]) -> usize {
        self.enqueue_input(input)
    }
}

/// The console input currently fed by stdin, if any.
type Target = Arc<Mutex<Option<Arc<Mutex<dyn InputSink>>>>>;

/// Copies the launcher's stdin into the current VM's console. One thread
/// for the life of the process: across a guest reboot only its target
/// changes. Bytes typed while no VM runs are dropped.
pub struct StdinPump {
    target: Target,
}

impl StdinPump {
    /// Starts the `stdin` thread.
    pub fn start(mode: SeccompMode) -> std::io::Result<StdinPump> {
        let target: Target = Arc::default();
        let t = target.clone();
        std::thread::Builder::new().name("stdin".into()).spawn(move || {
            // Reads stdin, hands bytes to the serial port (its interrupt is
            // an eventfd write), waits for the guest to drain its FIFO.
            if let Err(e) = seccomp::apply("stdin", &[&[libc::SYS_read]], mode) {
                log::error!("{e}; the guest gets no keyboard input");
                return;
            }
            pump(t)
        })?;
        Ok(StdinPump { target })
    }

    pub fn set_target(&self, sink: Option<Arc<Mutex<dyn InputSink>>>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = sink;
    }
}

fn pump(target: Target) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        // Either way the VM goes on, without keyboard input from now on.
        let n = match stdin.read(&mut buf) {
            Ok(0) => {
                log::info!("stdin closed: the guest's serial port gets no more input; the VM goes on");
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("cannot read stdin ({e}): the guest's serial port gets no more input; the VM goes on");
                return;
            }
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let sink = target.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let Some(sink) = sink else { break };
            let took = sink.lock().unwrap_or_else(|e| e.into_inner()).push(rest);
            rest = &rest[took..];
            if took == 0 {
                // The guest has not drained the FIFO yet; typing is slow
                // enough that polling here costs nothing.
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_writes_reach_the_output_and_input_raises_the_irq() {
        let cap = Capture::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq.try_clone().unwrap(), Box::new(cap.clone()));
        for b in b"hi\n" {
            port.write(0, &[*b]);
        }
        assert_eq!(&*cap.0.lock().unwrap(), b"hi\n");
        // Enable the received-data interrupt (IER bit 0), then feed input.
        port.write(1, &[1]);
        assert_eq!(port.push(b"ab"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut d = [0u8];
        port.read(0, &mut d);
        assert_eq!(d[0], b'a');
    }
}
