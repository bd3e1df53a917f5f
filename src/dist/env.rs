//! The rank of this process and where the ranks meet, from the environment torchrun, Slurm and
//! `ipo launch` set: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, with
//! SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID as fallbacks (used only when srun started this
//! task, i.e. SLURM_PROCID is set), and IPO_DIST_TIMEOUT (seconds each wait may take, default
//! 600). Without any of them the process is world 1. Errors name the variable and its value.

use std::time::Duration;

use super::CommError;

pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// Rank within this node (selects the GPU: `cuda:N` becomes `cuda:N+LOCAL_RANK`).
    pub local_rank: usize,
    /// MASTER_ADDR and MASTER_PORT (both required when world > 1).
    pub master_addr: String,
    pub master_port: u16,
    /// How long any wait (rendezvous, a collective) may take before the rank it waits for is
    /// declared stalled.
    pub timeout: Duration,
}

impl DistEnv {
    pub fn from_env() -> Result<DistEnv, CommError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As `from_env`, with `get` in place of the process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<DistEnv, CommError> {
        let bad = |var: &str, v: &str, want: &str| CommError::Env(format!("{var}={v:?}: expected {want}"));
        let int = |var: &str| -> Result<Option<usize>, CommError> {
            match get(var) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| bad(var, &v, "a non-negative integer")),
            }
        };
        // torchrun's names first; Slurm's when srun started this task.
        let slurm = get("SLURM_PROCID").is_some();
        let pick = |ours: &'static str, theirs: &'static str| -> Result<(Option<usize>, &'static str), CommError> {
            match int(ours)? {
                Some(v) => Ok((Some(v), ours)),
                None if slurm => Ok((int(theirs)?, theirs)),
                None => Ok((None, ours)),
            }
        };
        let (world, world_var) = pick("WORLD_SIZE", "SLURM_NTASKS")?;
        let (rank, rank_var) = pick("RANK", "SLURM_PROCID")?;
        let (local, _) = pick("LOCAL_RANK", "SLURM_LOCALID")?;
        let world = world.unwrap_or(1);
        if world == 0 {
            return Err(bad(world_var, "0", "a world size >= 1"));
        }
        let rank = match rank {
            Some(r) if r >= world => return Err(CommError::Env(format!("{rank_var}={r} is not below {world_var}={world}: ranks are 0..{}", world - 1))),
            Some(r) => r,
            None if world == 1 => 0,
            None => return Err(CommError::Env(format!("{world_var}={world} but RANK is not set: every process of a job needs its RANK"))),
        };
        let timeout = match get("IPO_DIST_TIMEOUT") {
            None => DEFAULT_TIMEOUT,
            Some(v) => match v.trim().parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() => Duration::from_secs_f64(s),
                _ => return Err(bad("IPO_DIST_TIMEOUT", &v, "a number of seconds > 0")),
            },
        };
        let (mut master_addr, mut master_port) = (String::new(), 0);
        if world > 1 {
            let need = |var: &str| {
                get(var).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                    CommError::Env(format!("{var} is not set: the {world} ranks meet at MASTER_ADDR:MASTER_PORT (ipo launch and torchrun set both)"))
                })
            };
            master_addr = need("MASTER_ADDR")?.trim().to_string();
            let p = need("MASTER_PORT")?;
            master_port = p.trim().parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| bad("MASTER_PORT", &p, "a TCP port 1-65535"))?;
        }
        Ok(DistEnv { rank, world, local_rank: local.unwrap_or(rank), master_addr, master_port, timeout })
    }

    /// `MASTER_ADDR:MASTER_PORT`.
    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<DistEnv, String> {
        let map: std::collections::HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_lookup(|k| map.get(k).cloned()).map_err(|e| e.to_string())
    }

    #[test]
    fn torchrun_and_slurm_variables() {
        assert_eq!(env(&[]).unwrap().world, 1);
        let e =
            env(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "node7"), ("MASTER_PORT", "29511"), ("IPO_DIST_TIMEOUT", "2.5")])
                .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.master().as_str(), e.timeout), (3, 4, 1, "node7:29511", Duration::from_millis(2500)));
        // Slurm's names when srun started the task; torchrun's win where both are set.
        let e = env(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap();
        assert_eq!((e.rank, e.world, e.local_rank), (5, 8, 1));
        let e = env(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap();
        assert_eq!((e.rank, e.world), (0, 1));
        // An salloc shell (SLURM_NTASKS without SLURM_PROCID) is not a distributed task.
        assert_eq!(env(&[("SLURM_NTASKS", "8")]).unwrap().world, 1);
    }

    #[test]
    fn bad_variables_are_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("WORLD_SIZE", "two")], "WORLD_SIZE=\"two\": expected a non-negative integer"),
            (&[("WORLD_SIZE", "0")], "WORLD_SIZE=\"0\": expected a world size >= 1"),
            (&[("WORLD_SIZE", "2")], "WORLD_SIZE=2 but RANK is not set"),
            (&[("WORLD_SIZE", "2"), ("RANK", "-1")], "RANK=\"-1\": expected a non-negative integer"),
            (&[("WORLD_SIZE", "2"), ("RANK", "2")], "RANK=2 is not below WORLD_SIZE=2"),
            (&[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")], "SLURM_PROCID=4 is not below SLURM_NTASKS=4"),
            (&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "x")], "SLURM_NTASKS=\"x\""),
            (&[("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "a")], "LOCAL_RANK=\"a\""),
            (&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "1")], "MASTER_ADDR is not set"),
            (&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h")], "MASTER_PORT is not set"),
            (&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")], "MASTER_PORT=\"70000\": expected a TCP port"),
            (&[("IPO_DIST_TIMEOUT", "-3")], "IPO_DIST_TIMEOUT=\"-3\""),
        ];
        for (vars, want) in cases {
            let e = env(vars).unwrap_err();
            assert!(e.contains(want), "{vars:?}: {e}");
        }
    }
}
