//! Finding a CUDA user-space library (NVRTC here; cuBLAS in the ipo crate) of CUDA 13 or 12
//! wherever a machine keeps it, without LD_LIBRARY_PATH. Rules, in order (the first library
//! that opens wins):
//!
//! 1. the env var of the library (`IPO_NVRTC`, `IPO_CUBLAS`): a file path. When set it is the
//!    only candidate, so a wrong path is an error naming it, never a silent fallback;
//! 2. the pip prefixes of scripts/setup-cuda.sh: `$IPO_CUDA_DEPS`, `<workspace>/.deps/cuda`;
//! 3. `$CUDA_HOME`, `$CUDA_PATH`: `lib64`, `lib`, `targets/x86_64-linux/lib`;
//! 4. `/usr/local/cuda/lib64`, then `/usr/local/cuda-X.Y/lib64`, newest first;
//! 5. the lib folders of the `nvidia-*` pip packages under every site-packages folder of the
//!    machine's Pythons (`python3`/`python` on PATH, asked once; `$VIRTUAL_ENV`, `$CONDA_PREFIX`);
//! 6. the bare sonames, through the dynamic loader's own path.
//!
//! In each folder `lib<name>.so.13` is tried before `.so.12`. A `stubs` folder (the toolkit's
//! link-time fakes of libcuda/libcublas) is never looked in. Before the library itself, its
//! companions are opened from the same folder by full path (NVRTC: `libnvrtc-builtins.so.N.*`,
//! which NVRTC dlopens by soname; cuBLAS: `libcublasLt.so.N`): glibc then satisfies the
//! library's own lookups of them from the already-loaded copies.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// CUDA major versions tried in each folder, newest first.
pub const MAJORS: [u32; 2] = [13, 12];

/// What to look for.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// Name in messages ("NVRTC", "cuBLAS").
    pub name: &'static str,
    /// File name before `.so`: "libnvrtc".
    pub stem: &'static str,
    /// The env var that names the library file.
    pub env: &'static str,
    /// File-name prefixes of the libraries to open first from the same folder, `{N}` standing
    /// for the major version ("libnvrtc-builtins.so.{N}." matches libnvrtc-builtins.so.13.0).
    pub companions: &'static [&'static str],
    /// Lib folders of the pip wheels, relative to a site-packages folder (or a pip prefix).
    pub pip_dirs: &'static [&'static str],
    /// Sonames' major versions tried in each folder, in order: `MAJORS` for the CUDA
    /// libraries, whose major is CUDA's; NCCL has its own (`libnccl.so.2`).
    pub majors: &'static [u32],
}

pub const NVRTC: Spec = Spec {
    name: "NVRTC",
    stem: "libnvrtc",
    env: "IPO_NVRTC",
    companions: &["libnvrtc-builtins.so.{N}."],
    pip_dirs: &["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"],
    majors: &MAJORS,
};

/// Where to look: gathered from the process (`Env::from_process`) or given by a test.
#[derive(Clone, Debug, Default)]
pub struct Env {
    /// The value of the spec's env var, when set and non-empty.
    pub explicit: Option<PathBuf>,
    /// Pip prefixes of scripts/setup-cuda.sh ($IPO_CUDA_DEPS, <workspace>/.deps/cuda).
    pub deps: Vec<PathBuf>,
    /// $CUDA_HOME, $CUDA_PATH.
    pub cuda_homes: Vec<PathBuf>,
    /// The folder holding `cuda` and `cuda-X.Y` (/usr/local).
    pub usr_local: PathBuf,
    /// site-packages folders of the machine's Pythons.
    pub site_packages: Vec<PathBuf>,
}

impl Env {
    /// The environment of this process for `spec`.
    pub fn from_process(spec: &Spec) -> Env {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let ws = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.deps/cuda");
        Env {
            explicit: var(spec.env),
            deps: var("IPO_CUDA_DEPS").into_iter().chain([ws]).collect(),
            cuda_homes: ["CUDA_HOME", "CUDA_PATH"].iter().filter_map(|k| var(k)).collect(),
            usr_local: PathBuf::from("/usr/local"),
            site_packages: python_site_packages().to_vec(),
        }
    }
}

/// site-packages of `python3` and `python` on PATH (asked once per process), `$VIRTUAL_ENV` and
/// `$CONDA_PREFIX`; existing folders only, each once.
fn python_site_packages() -> &'static [PathBuf] {
    static SITES: OnceLock<Vec<PathBuf>> = OnceLock::new();
    SITES.get_or_init(|| {
        let mut v: Vec<PathBuf> = Vec::new();
        let script = "import site\nfor p in site.getsitepackages() + [site.getusersitepackages()]: print(p)";
        for py in ["python3", "python"] {
            if let Ok(out) = std::process::Command::new(py).args(["-c", script]).stderr(std::process::Stdio::null()).output() {
                v.extend(String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from));
            }
        }
        for prefix in ["VIRTUAL_ENV", "CONDA_PREFIX"].iter().filter_map(std::env::var_os) {
            let lib = Path::new(&prefix).join("lib");
            for d in sorted_dir(&lib).into_iter().filter(|d| file_name(d).starts_with("python")) {
                v.push(d.join("site-packages"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        v.retain(|p| p.is_dir() && seen.insert(p.clone()));
        v
    })
}

/// The CUDA headers the kernels include (`cuda_bf16.h` and what it pulls in), when no
/// IPO_CUDA_INCLUDE or setup-cuda.sh prefix names them: the first folder holding
/// `cuda_bf16.h` among $CUDA_HOME/$CUDA_PATH, /usr/local/cuda, /usr/local/cuda-X.Y (newest
/// first) and the pip wheels (`nvidia/cu13/include`, `nvidia/cuda_runtime/include`).
pub fn include_dir() -> Option<PathBuf> {
    let env = Env::from_process(&NVRTC);
    include_dir_in(&env)
}

pub fn include_dir_in(env: &Env) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = Vec::new();
    for d in &env.deps {
        v.push(d.join("nvidia/cuda_runtime/include"));
    }
    for h in &env.cuda_homes {
        v.push(h.join("include"));
        v.push(h.join("targets/x86_64-linux/include"));
    }
    v.push(env.usr_local.join("cuda/include"));
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = sorted_dir(&env.usr_local)
        .into_iter()
        .filter_map(|d| {
            let ver = file_name(&d).strip_prefix("cuda-")?.split('.').map(|x| x.parse().ok()).collect::<Option<Vec<u32>>>()?;
            Some((ver, d.join("include")))
        })
        .collect();
    versioned.sort_by(|a, b| b.0.cmp(&a.0));
    v.extend(versioned.into_iter().map(|(_, d)| d));
    for s in &env.site_packages {
        v.push(s.join("nvidia/cu13/include"));
        v.push(s.join("nvidia/cuda_runtime/include"));
    }
    v.into_iter().find(|d| d.join("cuda_bf16.h").is_file())
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Entries of `dir`, sorted by name (empty when unreadable).
fn sorted_dir(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// A place to try: a file path, or a bare soname for the dynamic loader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    /// The rule that produced it ("$IPO_NVRTC", "CUDA_HOME", "pip site-packages", ...).
    pub rule: String,
    /// The major version the name says (13, 12), when it says one.
    pub major: Option<u32>,
}

/// `(folder, rule)` in search order, `stubs` folders removed.
fn folders(spec: &Spec, env: &Env) -> Vec<(PathBuf, String)> {
    let mut v: Vec<(PathBuf, String)> = Vec::new();
    for d in &env.deps {
        v.extend(spec.pip_dirs.iter().map(|p| (d.join(p), format!("setup-cuda.sh prefix {}", d.display()))));
    }
    for h in &env.cuda_homes {
        v.extend(["lib64", "lib", "targets/x86_64-linux/lib"].iter().map(|l| (h.join(l), "CUDA_HOME/CUDA_PATH".to_string())));
    }
    v.push((env.usr_local.join("cuda/lib64"), "toolkit /usr/local/cuda".into()));
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = sorted_dir(&env.usr_local)
        .into_iter()
        .filter_map(|d| {
            let ver = file_name(&d).strip_prefix("cuda-")?.split('.').map(|x| x.parse().ok()).collect::<Option<Vec<u32>>>()?;
            Some((ver, d.join("lib64")))
        })
        .collect();
    versioned.sort_by(|a, b| b.0.cmp(&a.0));
    v.extend(versioned.into_iter().map(|(_, d)| (d, "toolkit /usr/local/cuda-X.Y".to_string())));
    for s in &env.site_packages {
        v.extend(spec.pip_dirs.iter().map(|p| (s.join(p), "pip site-packages".to_string())));
    }
    v.retain(|(d, _)| !d.components().any(|c| c.as_os_str() == "stubs"));
    v
}

/// Every candidate in search order (files that may not exist; bare sonames last).
pub fn candidates(spec: &Spec, env: &Env) -> Vec<Candidate> {
    if let Some(p) = &env.explicit {
        let major = file_name(p).rsplit_once(".so.").and_then(|(_, v)| v.split('.').next()?.parse().ok());
        return vec![Candidate { path: p.clone(), rule: format!("${}", spec.env), major }];
    }
    let mut v = Vec::new();
    for (dir, rule) in folders(spec, env) {
        v.extend(spec.majors.iter().map(|&n| Candidate { path: dir.join(format!("{}.so.{n}", spec.stem)), rule: rule.clone(), major: Some(n) }));
    }
    v.extend(spec.majors.iter().map(|&n| Candidate { path: PathBuf::from(format!("{}.so.{n}", spec.stem)), rule: "dynamic loader path".into(), major: Some(n) }));
    v
}

/// A library that opened, how it was found, and what was tried before it.
#[derive(Debug)]
pub struct Loaded {
    pub lib: libloading::Library,
    /// Full path (or the bare soname when the dynamic loader found it).
    pub path: PathBuf,
    pub rule: String,
    /// Companion libraries opened first, by full path.
    pub companions: Vec<PathBuf>,
    /// Candidates tried before this one, each with why it was passed over.
    pub tried: Vec<String>,
    /// Kept open for the library's lifetime.
    _companion_libs: Vec<libloading::Library>,
}

/// No candidate opened; `tried` says what was tried and why each failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{name} library not found; tried: {}", tried.join("; "))]
pub struct NotFound {
    pub name: &'static str,
    pub tried: Vec<String>,
}

/// Companion files of `spec` for major `n` in `dir`: for each prefix, the first matching file.
fn companion_files(spec: &Spec, dir: &Path, n: u32) -> Vec<PathBuf> {
    let entries = sorted_dir(dir);
    spec.companions
        .iter()
        .filter_map(|pre| {
            let pre = pre.replace("{N}", &n.to_string());
            entries.iter().find(|e| file_name(e).starts_with(&pre)).cloned()
        })
        .collect()
}

/// Opens the companions of `c` (from its folder) and then `c` itself.
fn open(spec: &Spec, c: &Candidate) -> Result<(libloading::Library, Vec<PathBuf>, Vec<libloading::Library>), String> {
    let dir = c.path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        if !c.path.exists() {
            return Err("absent".into());
        }
        let majors: Vec<u32> = c.major.map_or(spec.majors.to_vec(), |n| vec![n]);
        let files: Vec<PathBuf> = majors.iter().flat_map(|&n| companion_files(spec, dir, n)).collect();
        let mut libs = Vec::new();
        for f in &files {
            libs.push(unsafe { libloading::Library::new(f) }.map_err(|e| format!("companion {}: {e}", f.display()))?);
        }
        let lib = unsafe { libloading::Library::new(&c.path) }.map_err(|e| e.to_string())?;
        Ok((lib, files, libs))
    } else {
        let lib = unsafe { libloading::Library::new(&c.path) }.map_err(|e| e.to_string())?;
        Ok((lib, Vec::new(), Vec::new()))
    }
}

/// The first candidate of `spec` in `env` that opens.
pub fn load_in(spec: &Spec, env: &Env) -> Result<Loaded, NotFound> {
    let mut tried = Vec::new();
    for c in candidates(spec, env) {
        match open(spec, &c) {
            Ok((lib, companions, libs)) => {
                return Ok(Loaded { lib, path: c.path, rule: c.rule, companions, tried, _companion_libs: libs });
            }
            Err(why) => tried.push(format!("{} [{}]: {why}", c.path.display(), c.rule)),
        }
    }
    Err(NotFound { name: spec.name, tried })
}

/// `load_in` with this process's environment.
pub fn load(spec: &Spec) -> Result<Loaded, NotFound> {
    load_in(spec, &Env::from_process(spec))
}

impl Loaded {
    /// "/path (found via RULE)".
    pub fn describe(&self) -> String {
        format!("{} (found via {})", self.path.display(), self.rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"not a library").unwrap();
    }

    fn tree() -> (PathBuf, Env) {
        let root = std::env::temp_dir().join(format!("ptxsim-cudalib-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&root);
        let ul = root.join("usr/local");
        touch(&ul.join("cuda/lib64/stubs/libnvrtc.so.13"));
        touch(&ul.join("cuda-12.9/lib64/libnvrtc.so.12"));
        touch(&ul.join("cuda-13.0/lib64/libnvrtc.so.13"));
        touch(&ul.join("cuda-13.0/lib64/libnvrtc-builtins.so.13.0"));
        touch(&root.join("site/nvidia/cu13/lib/libnvrtc.so.13"));
        let env = Env { usr_local: ul, site_packages: vec![root.join("site")], ..Env::default() };
        (root, env)
    }

    fn existing(c: &[Candidate]) -> Vec<PathBuf> {
        c.iter().filter(|c| c.path.exists()).map(|c| c.path.clone()).collect()
    }

    #[test]
    fn include_dir_is_the_first_folder_with_cuda_bf16_h() {
        let (root, env) = tree();
        assert_eq!(include_dir_in(&env), None, "no headers anywhere yet");
        touch(&root.join("site/nvidia/cu13/include/cuda_bf16.h"));
        assert_eq!(include_dir_in(&env), Some(root.join("site/nvidia/cu13/include")));
        touch(&root.join("usr/local/cuda-12.9/include/cuda_bf16.h"));
        touch(&root.join("usr/local/cuda-13.0/include/cuda_fp16.h")); // no cuda_bf16.h: skipped
        assert_eq!(include_dir_in(&env), Some(root.join("usr/local/cuda-12.9/include")), "toolkits before pip");
        touch(&root.join("usr/local/cuda-13.0/include/cuda_bf16.h"));
        assert_eq!(include_dir_in(&env), Some(root.join("usr/local/cuda-13.0/include")), "newest toolkit first");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn order_newest_toolkit_then_pip_and_never_stubs() {
        let (root, env) = tree();
        let c = candidates(&NVRTC, &env);
        let ul = root.join("usr/local");
        assert_eq!(
            existing(&c),
            vec![ul.join("cuda-13.0/lib64/libnvrtc.so.13"), ul.join("cuda-12.9/lib64/libnvrtc.so.12"), root.join("site/nvidia/cu13/lib/libnvrtc.so.13")]
        );
        assert!(c.iter().all(|c| !c.path.to_string_lossy().contains("stubs")));
        assert_eq!(c.last().unwrap().path, PathBuf::from("libnvrtc.so.12"));
        // .so.13 before .so.12 in one folder.
        let i13 = c.iter().position(|c| c.path == ul.join("cuda/lib64/libnvrtc.so.13")).unwrap();
        assert_eq!(c[i13 + 1].path, ul.join("cuda/lib64/libnvrtc.so.12"));
        // CUDA_HOME and the setup-cuda.sh prefix come first.
        let env2 = Env { cuda_homes: vec![ul.join("cuda-12.9")], deps: vec![root.join("site")], ..env };
        let c2 = candidates(&NVRTC, &env2);
        assert_eq!(existing(&c2)[..2], [root.join("site/nvidia/cu13/lib/libnvrtc.so.13"), ul.join("cuda-12.9/lib64/libnvrtc.so.12")]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn error_names_every_path_tried() {
        let (root, env) = tree();
        // Fake files do not open; the soname fallbacks find no NVRTC under this name either.
        let spec = Spec { stem: "libnvrtc-ipo-test", companions: &[], ..NVRTC };
        touch(&env.usr_local.join("cuda-13.0/lib64/libnvrtc-ipo-test.so.13"));
        let e = load_in(&spec, &env).unwrap_err();
        let msg = e.to_string();
        let fake = env.usr_local.join("cuda-13.0/lib64/libnvrtc-ipo-test.so.13");
        // Found but not loadable: the loader's reason, not "absent".
        assert!(msg.contains(&format!("{} [toolkit /usr/local/cuda-X.Y]: {}", fake.display(), fake.display())), "{msg}");
        assert!(msg.contains("cuda/lib64/libnvrtc-ipo-test.so.12 [toolkit /usr/local/cuda]: absent"), "{msg}");
        assert!(msg.contains("libnvrtc-ipo-test.so.13 [dynamic loader path]"), "{msg}");
        assert!(!msg.contains("stubs"), "{msg}");
        // The builtins companion is opened (and fails) before the library itself.
        // (The bare soname at the end may open a real NVRTC; the tried list is there either way.)
        let tried = match load_in(&NVRTC, &Env { site_packages: vec![], ..env.clone() }) {
            Ok(l) => l.tried,
            Err(e) => e.tried,
        };
        let want = format!("companion {}", env.usr_local.join("cuda-13.0/lib64/libnvrtc-builtins.so.13.0").display());
        assert!(tried.iter().any(|t| t.contains(&want)), "{tried:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn explicit_path_is_the_only_candidate() {
        let env = Env { explicit: Some(PathBuf::from("/nonexistent/libnvrtc.so.13")), usr_local: PathBuf::from("/usr/local"), ..Env::default() };
        let c = candidates(&NVRTC, &env);
        assert_eq!(c, vec![Candidate { path: PathBuf::from("/nonexistent/libnvrtc.so.13"), rule: "$IPO_NVRTC".into(), major: Some(13) }]);
        let e = load_in(&NVRTC, &env).unwrap_err().to_string();
        assert_eq!(e, "NVRTC library not found; tried: /nonexistent/libnvrtc.so.13 [$IPO_NVRTC]: absent");
    }
}
