//! Progress bars on stderr for commands that run longer than a second. The
//! work counts into a `Meter` (in this process, or in the gateway's, read
//! over the admin socket); this draws it with indicatif. Drawn only when
//! stderr is a terminal unless `--progress always`, so scripts, pipes and CI
//! logs get the command's output and nothing else.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use gateway::util::progress::{Progress, Unit};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// When to draw progress bars (`--progress`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// When stderr is a terminal.
    #[default]
    Auto,
    /// Always, even into a pipe or a file.
    Always,
    /// Never.
    Never,
}

impl ProgressMode {
    fn draws(self) -> bool {
        match self {
            Self::Auto => std::io::stderr().is_terminal(),
            Self::Always => true,
            Self::Never => false,
        }
    }
}

/// One operation's bar, redrawn from each [`Progress`] it is handed; its
/// step changes (pinning, then signing…) restyle it, and the end prints a
/// one-line summary of the last step.
#[derive(Debug)]
pub struct Bar {
    bar: ProgressBar,
    step: Option<(String, Unit, Option<u64>)>,
    started: Instant,
    last: Progress,
}

impl Bar {
    /// A bar for `mode`, or `None` when nothing is to be drawn.
    pub fn new(mode: ProgressMode) -> Option<Self> {
        if !mode.draws() {
            return None;
        }
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            // indicatif hides itself off a terminal; `always` means draw anyway.
            ProgressDrawTarget::term_like(Box::new(PlainStderr))
        };
        Some(Self {
            bar: ProgressBar::with_draw_target(None, target),
            step: None,
            started: Instant::now(),
            last: Progress::default(),
        })
    }

    /// Shows where the operation stands now.
    pub fn update(&mut self, now: Progress) {
        if now.label.is_empty() {
            return;
        }
        let step = (now.label.clone(), now.unit, now.total);
        if self.step.as_ref() != Some(&step) {
            self.bar.set_style(style(now.unit, now.total.is_some()));
            self.bar.set_message(now.label.clone());
            match now.total {
                Some(total) => self.bar.set_length(total),
                None => self.bar.unset_length(),
            }
            self.bar.reset_elapsed();
            self.started = Instant::now();
            self.step = Some(step);
        }
        self.bar.set_position(now.done);
        // Our own average since the step began: indicatif's estimate jumps
        // wildly when counts arrive in 200 ms steps over the admin socket.
        if now.unit == Unit::Bytes {
            let rate = now.done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            self.bar
                .set_prefix(format!("{}/s", HumanBytes(rate as u64)));
        }
        self.last = now;
    }

    /// Clears the bar without a summary (the command failed).
    pub fn abandon(self) {
        self.bar.finish_and_clear();
    }

    /// Clears the bar and prints what the last step did, with its rate.
    pub fn finish(self) {
        self.bar.finish_and_clear();
        if let Some(line) = summary(&self.last, self.started.elapsed().as_secs_f64()) {
            eprintln!("{line}");
        }
    }
}

fn style(unit: Unit, bounded: bool) -> ProgressStyle {
    let template = match (unit, bounded) {
        (Unit::Bytes, true) => {
            "{msg:>16} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}"
        }
        (Unit::Bytes, false) => "{msg:>16} {spinner} {bytes} {binary_bytes_per_sec}",
        (Unit::Items, true) => "{msg:>16} [{bar:30}] {pos}/{len} ETA {eta}",
        (Unit::Items, false) => "{msg:>16} {spinner} {pos}",
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// "pinning: 1.00 GiB in 3.2 s (320.00 MiB/s)": what a finished step did.
fn summary(last: &Progress, secs: f64) -> Option<String> {
    if last.label.is_empty() {
        return None;
    }
    let rate = |n: u64| n as f64 / secs.max(0.001);
    Some(match last.unit {
        Unit::Bytes => format!(
            "{}: {} in {secs:.1} s ({}/s)",
            last.label,
            HumanBytes(last.done),
            HumanBytes(rate(last.done) as u64)
        ),
        Unit::Items => format!(
            "{}: {} done in {secs:.1} s ({:.1}/s)",
            last.label,
            last.done,
            rate(last.done)
        ),
    })
}

/// stderr as a terminal of 80 columns, for `--progress always` into a pipe
/// or a file: the same redraws a terminal would get.
#[derive(Debug)]
struct PlainStderr;

impl PlainStderr {
    fn put(&self, text: &str) -> std::io::Result<()> {
        std::io::stderr().write_all(text.as_bytes())
    }
}

impl TermLike for PlainStderr {
    fn width(&self) -> u16 {
        80
    }

    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(&format!("\x1b[{n}A"))
    }

    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(&format!("\x1b[{n}B"))
    }

    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(&format!("\x1b[{n}C"))
    }

    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.put(&format!("\x1b[{n}D"))
    }

    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.put(&format!("{s}\n"))
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.put(s)
    }

    fn clear_line(&self) -> std::io::Result<()> {
        self.put("\r\x1b[2K")
    }

    fn flush(&self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_the_step_its_amount_and_rate() {
        let pinned = Progress {
            label: "pinning".to_owned(),
            unit: Unit::Bytes,
            done: 3 << 30,
            total: Some(3 << 30),
        };
        assert_eq!(
            summary(&pinned, 2.0).as_deref(),
            Some("pinning: 3.00 GiB in 2.0 s (1.50 GiB/s)")
        );
        let synced = Progress {
            label: "syncing anchors".to_owned(),
            unit: Unit::Items,
            done: 4,
            total: Some(4),
        };
        assert_eq!(
            summary(&synced, 0.5).as_deref(),
            Some("syncing anchors: 4 done in 0.5 s (8.0/s)")
        );
        assert_eq!(summary(&Progress::default(), 1.0), None);
    }
}
