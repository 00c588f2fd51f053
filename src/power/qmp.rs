//! QEMU's machine protocol (QMP) as a power switch, for lab VMs started with `-qmp unix:...` and
//! `-no-shutdown` (so a guest that powers off stays as a stopped machine that can be switched on again).
//!
//! off (hard) = `stop` (the CPUs halt: the node is dark), off (soft) = `system_powerdown` (ACPI button),
//! on = `system_reset` + `cont` (firmware starts again, as after power-on), status = `query-status`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{failed, PowerDriver, PowerResult, PowerState};

pub struct Qmp {
    socket: PathBuf,
}

impl Qmp {
    pub fn new(socket: &Path) -> Qmp {
        Qmp {
            socket: socket.to_path_buf(),
        }
    }

    /// Runs commands in one session, returning each one's `return` value.
    fn run(&self, commands: &[&str]) -> PowerResult<Vec<serde_json::Value>> {
        let s = UnixStream::connect(&self.socket)
            .map_err(|e| failed(format!("qmp {}: {e}", self.socket.display())))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(failed)?;
        let mut w = s.try_clone().map_err(failed)?;
        let mut r = BufReader::new(s);
        let next = |r: &mut BufReader<UnixStream>| -> PowerResult<serde_json::Value> {
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).map_err(failed)? == 0 {
                    return Err(failed("qmp: connection closed"));
                }
                let v: serde_json::Value = serde_json::from_str(&line).map_err(failed)?;
                // Asynchronous events may come between a command and its answer.
                if v.get("event").is_none() {
                    return Ok(v);
                }
            }
        };
        next(&mut r)?; // greeting
        let mut out = Vec::new();
        for cmd in std::iter::once(&"qmp_capabilities").chain(commands) {
            writeln!(w, "{{\"execute\": \"{cmd}\"}}").map_err(failed)?;
            let v = next(&mut r)?;
            if let Some(e) = v.get("error") {
                return Err(failed(format!("qmp {cmd}: {e}")));
            }
            out.push(v.get("return").cloned().unwrap_or_default());
        }
        out.remove(0);
        Ok(out)
    }
}

impl PowerDriver for Qmp {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn on(&self) -> PowerResult<()> {
        // The reset is carried out asynchronously: `cont` is refused ("Resetting the Virtual Machine is
        // required") until it has been, so it is retried briefly.
        self.run(&["system_reset"])?;
        let mut last = None;
        for _ in 0..100 {
            match self.run(&["cont"]) {
                Ok(_) => return Ok(()),
                Err(e) if e.to_string().contains("Resetting") => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| failed("qmp: cont refused")))
    }

    fn off(&self, hard: bool) -> PowerResult<()> {
        self.run(&[if hard { "stop" } else { "system_powerdown" }])
            .map(|_| ())
    }

    fn cycle(&self) -> PowerResult<()> {
        self.on()
    }

    fn status(&self) -> PowerResult<PowerState> {
        let v = self.run(&["query-status"])?;
        Ok(match v[0]["running"].as_bool() {
            Some(true) => PowerState::On,
            Some(false) => PowerState::Off,
            None => PowerState::Unknown,
        })
    }

    fn boot_network_once(&self) -> PowerResult<()> {
        // Lab VMs have no disk: every boot is a network boot already.
        Ok(())
    }
}
