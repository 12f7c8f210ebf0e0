//! Legacy PC devices: the 8250 serial console, the i8042 reset line and
//! the boot timer.

mod boot_timer;
mod i8042;
mod serial;

pub use boot_timer::{BootTimer, BOOT_TIMER_MAGIC, BOOT_TIMER_PORT};
pub use i8042::{I8042, I8042_PORT_COMMAND, I8042_PORT_DATA};
pub use serial::{
    ConsolePending, EventFdTrigger, SerialConsole, SerialCounters, SerialRegisters, SerialStateError, COM1_IRQ,
    COM1_PORT, CONSOLE_BATCH,
};
