//! Just enough of the i8042 keyboard controller for the guest to reset the
//! machine: command 0xFE pulses the CPU reset line, which ends the VM.
//! Linux's i8042 driver also probes it (self test, command byte), so those
//! commands answer as a controller with no keyboard attached would.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Data port.
pub const I8042_PORT_DATA: u64 = 0x60;
/// Status (read) / command (write) port.
pub const I8042_PORT_COMMAND: u64 = 0x64;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_PULSE_RESET: u8 = 0xfe;
const SELF_TEST_PASSED: u8 = 0x55;
/// Status: output buffer full.
const STATUS_OBF: u8 = 0x01;
/// Status: system flag (self test passed).
const STATUS_SYS: u8 = 0x04;
/// Status: the last write was a command.
const STATUS_CMD: u8 = 0x08;
/// Controller configuration: system flag, keyboard port disabled.
const DEFAULT_CTR: u8 = 0x14;

/// The controller. It sits on the PIO bus at `I8042_PORT_DATA` with a range of
/// 5 ports, so the data port is offset 0 and the command port offset 4.
pub struct I8042 {
    reset: EventFd,
    ctr: u8,
    status: u8,
    output: Option<u8>,
    expect_ctr: bool,
}

impl I8042 {
    /// A controller that signals `reset` when the guest asks for a reset.
    pub fn new(reset: EventFd) -> Self {
        Self { reset, ctr: DEFAULT_CTR, status: STATUS_SYS, output: None, expect_ctr: false }
    }

    fn respond(&mut self, byte: u8) {
        self.output = Some(byte);
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.output.take().unwrap_or(0),
            4 => self.status | if self.output.is_some() { STATUS_OBF } else { 0 },
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            4 => {
                self.status |= STATUS_CMD;
                match byte {
                    CMD_READ_CTR => self.respond(self.ctr),
                    CMD_WRITE_CTR => self.expect_ctr = true,
                    CMD_SELF_TEST => self.respond(SELF_TEST_PASSED),
                    CMD_PULSE_RESET => {
                        // If the event loop is gone the VM is going anyway.
                        let _ = self.reset.write(1);
                    }
                    _ => {}
                }
            }
            0 => {
                self.status &= !STATUS_CMD;
                if std::mem::take(&mut self.expect_ctr) {
                    self.ctr = byte;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (I8042, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(evt.try_clone().unwrap()), evt)
    }

    #[test]
    fn pulse_reset_command_signals_the_reset_line() {
        let (mut kbd, evt) = controller();
        assert!(evt.read().is_err(), "no reset before the command");
        kbd.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn probe_commands_answer_like_a_controller_without_keyboard() {
        let (mut kbd, _evt) = controller();
        let mut b = [0u8];
        kbd.write(4, &[CMD_SELF_TEST]);
        kbd.read(4, &mut b);
        assert_eq!(b[0] & STATUS_OBF, STATUS_OBF);
        kbd.read(0, &mut b);
        assert_eq!(b[0], SELF_TEST_PASSED);
        kbd.write(4, &[CMD_WRITE_CTR]);
        kbd.write(0, &[0x47]);
        kbd.write(4, &[CMD_READ_CTR]);
        kbd.read(0, &mut b);
        assert_eq!(b[0], 0x47);
        kbd.read(4, &mut b);
        assert_eq!(b[0] & STATUS_OBF, 0);
    }
}
