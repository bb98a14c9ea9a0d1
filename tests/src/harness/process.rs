//! Child processes for fault injection: started with piped stdin and stdout, read line by line
//! with a timeout, killed with SIGKILL, and never left behind — dropping a [`ChildProcess`]
//! kills it, so a failing test (a panic) takes its children with it. A child also stops by
//! itself when its stdin closes, which covers a parent killed outright.

use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running child process.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    reaped: bool,
}

impl ChildProcess {
    /// Starts `program` with `args`; `name` is used in messages.
    pub fn spawn(name: &str, program: &Path, args: &[String]) -> std::io::Result<ChildProcess> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take();
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(ChildProcess {
            name: name.to_owned(),
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
            reaped: false,
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Writes one line to the child's stdin.
    pub fn say(&mut self, line: &str) -> std::io::Result<()> {
        match &mut self.stdin {
            Some(stdin) => {
                stdin.write_all(format!("{line}\n").as_bytes())?;
                stdin.flush()
            }
            None => Err(std::io::Error::other("stdin already closed")),
        }
    }

    /// The first line starting with `prefix` within `timeout`. Lines before it are kept (see
    /// [`ChildProcess::seen`]). On timeout, or if the child ends first, the error says what the
    /// child printed.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no `{prefix}` from {} within {timeout:?}; it said {:?}",
                        self.name, self.seen
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    return Err(format!(
                        "{} ended ({status:?}) before `{prefix}`; it said {:?}",
                        self.name, self.seen
                    ));
                }
            }
        }
    }

    /// Every line read so far that no [`ChildProcess::wait_for`] asked for, plus whatever is
    /// already waiting.
    pub fn seen(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        !self.reaped && matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: no destructor, no flush, no rollback. Returns whether the child was still
    /// running when the signal was sent (a kill that lands after the child exited by itself
    /// proves nothing).
    pub fn kill_9(mut self) -> std::io::Result<bool> {
        let running = self.is_running();
        // `Child::kill` sends SIGKILL on Unix.
        self.child.kill()?;
        self.child.wait()?;
        self.reaped = true;
        Ok(running)
    }

    /// Closes stdin (the child's signal to stop) and waits up to `timeout` for it to exit;
    /// kills it past that.
    pub fn stop(mut self, timeout: Duration) -> Result<ExitStatus, String> {
        drop(self.stdin.take());
        self.wait(timeout)
    }

    /// Waits up to `timeout` for the child to exit by itself; kills it past that.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.reaped = true;
                    return Ok(status);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("cannot poll {}: {e}", self.name)),
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.reaped = true;
                let seen = self.seen().to_vec();
                return Err(format!(
                    "{} did not exit within {timeout:?}; it said {seen:?}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
