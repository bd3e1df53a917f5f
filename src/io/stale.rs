//! Temp files and folders that a killed writer left behind. Every atomic writer here names its
//! temp `.<target name>.tmp-<pid>` beside the target (jsonl::Writer, checkpoint folders,
//! import-gguf folders); a `kill -9` or a panic between create and rename leaves it, and at 8B
//! scale an orphan checkpoint is tens of GB. `remove_stale` removes those whose process is gone,
//! before a writer makes its own.

use std::path::Path;

/// The pid of a temp named `.<name>.tmp-<pid>` where `name` passes `which`.
fn temp_pid(file_name: &str, which: &dyn Fn(&str) -> bool) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?;
    let (name, pid) = rest.rsplit_once(".tmp-")?;
    if !which(name) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` is running, as far as this machine can tell (`None`: no /proc).
fn alive(pid: u32) -> Option<bool> {
    if !Path::new("/proc/self").exists() {
        return None;
    }
    Some(pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes the temps in `dir` of targets whose name passes `which` and whose writer process is
/// no longer running on this machine; says so on stderr. Best effort: errors are ignored (the
/// writer's own temp has another name, so a leftover costs disk, not correctness). Returns how
/// many were removed.
pub(crate) fn remove_stale(dir: &Path, which: &dyn Fn(&str) -> bool) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_pid(&name, which) else { continue };
        if alive(pid) != Some(false) {
            continue;
        }
        let p = e.path();
        let removed = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        if removed.is_ok() {
            eprintln!("removed {}: a temporary left by process {pid}, which is no longer running", p.display());
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid that is never running: Linux pids stay below PID_MAX_LIMIT (2^22). (A free pid just
    /// above ours could be taken by a process another test starts before the check.)
    fn dead_pid() -> u32 {
        1 << 22
    }

    #[test]
    fn removes_only_dead_writers_temps_of_the_chosen_targets() {
        let d = tempfile::tempdir().unwrap();
        let dead = dead_pid();
        let me = std::process::id();
        let mk_dir = |n: &str| {
            std::fs::create_dir_all(d.path().join(n).join("inner")).unwrap();
            std::fs::write(d.path().join(n).join("inner/w.bin"), b"x").unwrap();
        };
        mk_dir(&format!(".step-5.tmp-{dead}"));
        std::fs::write(d.path().join(format!(".pairs.jsonl.tmp-{dead}")), b"{}").unwrap();
        mk_dir(&format!(".step-6.tmp-{me}")); // a live writer (this process)
        std::fs::write(d.path().join(format!(".other.jsonl.tmp-{dead}")), b"{}").unwrap(); // not chosen
        std::fs::write(d.path().join("step-5.tmp-1"), b"{}").unwrap(); // not a temp name
        std::fs::write(d.path().join(format!(".x.tmp-{dead}z")), b"{}").unwrap(); // no pid
        if alive(dead).is_none() {
            panic!("no /proc on this machine: the cleanup cannot tell live writers from dead ones");
        }
        let n = remove_stale(d.path(), &|name| name.starts_with("step-") || name == "pairs.jsonl");
        assert_eq!(n, 2);
        let mut left: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        let mut want = vec![format!(".other.jsonl.tmp-{dead}"), format!(".step-6.tmp-{me}"), format!(".x.tmp-{dead}z"), "step-5.tmp-1".to_string()];
        want.sort();
        assert_eq!(left, want);
    }
}
