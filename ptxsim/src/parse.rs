//! PTX text -> `Module`: a lexer, a statement parser for module directives, `.entry`/`.func`
//! bodies (registers, `.local`/`.shared`/`.param` declarations, labels, `{ }` scopes), and the
//! decoder that turns each instruction into the pre-decoded `ir::Op`. Errors carry the line.

use crate::alu;
use crate::ir::*;
use crate::num::Rnd;
use crate::Error;
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Id(String),
    Int(i128),
    F32(u32),
    F64(u64),
    Float(f64),
    Str(String),
    P(char),
}

fn lex(src: &str) -> Result<Vec<(Tok, u32)>, Error> {
    let b = src.as_bytes();
    let mut i = 0;
    let mut line = 1u32;
    let mut out = Vec::new();
    let idc = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c == b'%' || c == b'.';
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                if b[i] == b'\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 2;
        } else if c == b'"' {
            let s = i + 1;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += 1;
            }
            out.push((Tok::Str(src[s..i].to_string()), line));
            i += 1;
        } else if c.is_ascii_digit() {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
            let t = &src[s..i];
            let err = || Error::Parse { line, msg: format!("bad number {t:?}") };
            let tok = if (t.starts_with("0f") || t.starts_with("0F")) && t.len() == 10 {
                Tok::F32(u32::from_str_radix(&t[2..], 16).map_err(|_| err())?)
            } else if (t.starts_with("0d") || t.starts_with("0D")) && t.len() == 18 {
                Tok::F64(u64::from_str_radix(&t[2..], 16).map_err(|_| err())?)
            } else if t.starts_with("0x") || t.starts_with("0X") {
                Tok::Int(i128::from_str_radix(t[2..].trim_end_matches(['U', 'u']), 16).map_err(|_| err())?)
            } else if t.contains('.') || t.contains('e') || t.contains('E') {
                Tok::Float(t.parse().map_err(|_| err())?)
            } else if t.len() > 1 && t.starts_with('0') && t.bytes().all(|c| (b'0'..=b'7').contains(&c)) {
                Tok::Int(i128::from_str_radix(&t[1..], 8).map_err(|_| err())?)
            } else {
                Tok::Int(t.trim_end_matches(['U', 'u']).parse().map_err(|_| err())?)
            };
            out.push((tok, line));
        } else if idc(c) {
            let s = i;
            while i < b.len() && (idc(b[i]) || (b[i] == b':' && b.get(i + 1) == Some(&b':'))) {
                i += if b[i] == b':' { 2 } else { 1 };
            }
            out.push((Tok::Id(src[s..i].to_string()), line));
        } else {
            out.push((Tok::P(c as char), line));
            i += 1;
        }
    }
    Ok(out)
}

/// A parameter declaration: offset in the kernel param buffer or the function's param frame.
#[derive(Clone, Debug)]
pub(crate) struct ParamDecl {
    pub(crate) name: String,
    pub(crate) offset: u32,
    pub(crate) size: u32,
}

/// A `.entry` or `.func`.
#[derive(Clone, Debug)]
pub(crate) struct Func {
    pub(crate) name: String,
    pub(crate) entry: bool,
    pub(crate) start: u32,
    pub(crate) nregs: u32,
    pub(crate) params: Vec<ParamDecl>,
    pub(crate) rets: Vec<ParamDecl>,
    pub(crate) param_size: u32,
    pub(crate) fparam_size: u32,
    pub(crate) local_size: u32,
    pub(crate) defined: bool,
    pub(crate) callees: Vec<u32>,
}

/// Module-scope `.global` / `.const` variable.
#[derive(Clone, Debug)]
pub(crate) struct GlobalVar {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) align: u64,
    pub(crate) init: Vec<u8>,
}

/// Registers one function may declare (the most in NVRTC output of this repo: 1261): a bound
/// on the parser's symbol table, so `.reg .b32 %r<4294967295>;` is an error, not 4G entries.
const MAX_REGS: u32 = 1 << 16;

/// A parsed PTX module, ready to launch.
#[derive(Debug)]
pub struct Module {
    pub(crate) id: u64,
    pub(crate) code: Vec<Inst>,
    pub(crate) funcs: Vec<Func>,
    pub(crate) func_idx: HashMap<String, u32>,
    pub(crate) globals: Vec<GlobalVar>,
    pub(crate) shared_static: u32,
}

impl Module {
    /// Parse PTX text (as emitted by NVRTC).
    pub fn parse(ptx: &str) -> Result<Module, Error> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let toks = lex(ptx)?;
        let mut p = Parser {
            t: toks,
            i: 0,
            m: Module {
                id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                code: Vec::new(),
                funcs: Vec::new(),
                func_idx: HashMap::new(),
                globals: Vec::new(),
                shared_static: 0,
            },
            shared: HashMap::new(),
            gsyms: HashMap::new(),
            pending_calls: Vec::new(),
        };
        p.module()?;
        let mut m = p.m;
        for (pc, name, line) in p.pending_calls {
            let Some(&f) = m.func_idx.get(&name) else {
                return Err(Error::Parse { line, msg: format!("call to unknown function {name}") });
            };
            if let Op::Call { func, .. } = &mut m.code[pc as usize].op {
                *func = f;
            }
        }
        // call graph edges for frame sizing
        for fi in 0..m.funcs.len() {
            if !m.funcs[fi].defined {
                continue;
            }
            let start = m.funcs[fi].start as usize;
            let end = m.funcs.iter().filter(|g| g.defined && g.start as usize > start).map(|g| g.start as usize).min().unwrap_or(m.code.len());
            let mut cs: Vec<u32> = m.code[start..end].iter().filter_map(|i| if let Op::Call { func, .. } = i.op { Some(func) } else { None }).collect();
            cs.sort();
            cs.dedup();
            for &c in &cs {
                if !m.funcs[c as usize].defined {
                    return Err(Error::Parse { line: 0, msg: format!("call to function {} that is declared but not defined", m.funcs[c as usize].name) });
                }
            }
            m.funcs[fi].callees = cs;
        }
        Ok(m)
    }

    /// Names of the kernels (`.entry`) in the module.
    pub(crate) fn kernels(&self) -> Vec<&str> {
        self.funcs.iter().filter(|f| f.entry).map(|f| f.name.as_str()).collect()
    }
}

#[derive(Clone, Debug)]
enum Raw {
    Name(String),
    Imm(Tok),
    Not(String),
    Pair(String, String),
    Addr(Option<Box<Raw>>, i64),
    Vec(Vec<Raw>),
    List(Vec<Raw>),
    Sink,
}

#[derive(Clone, Copy, Debug)]
enum Sym {
    Reg(Reg),
    Shared(u32),
    Global(u32),
    Local(u32),
    KParam(u32),
    FParam(u32, u32),
}

struct Parser {
    t: Vec<(Tok, u32)>,
    i: usize,
    m: Module,
    shared: HashMap<String, u32>,
    gsyms: HashMap<String, u32>,
    pending_calls: Vec<(u32, String, u32)>,
}

struct FnCtx {
    scopes: Vec<HashMap<String, Sym>>,
    nregs: u32,
    local: u32,
    fparam: u32,
    labels: HashMap<String, u32>,
    pending: Vec<(u32, String, u32)>,
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a.max(1)) * a.max(1)
}

impl Parser {
    fn line(&self) -> u32 {
        self.t.get(self.i).or(self.t.last()).map(|t| t.1).unwrap_or(0)
    }
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, Error> {
        Err(Error::Parse { line: self.line(), msg: msg.into() })
    }
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i).map(|t| &t.0)
    }
    fn next(&mut self) -> Result<Tok, Error> {
        match self.t.get(self.i) {
            Some(t) => {
                self.i += 1;
                Ok(t.0.clone())
            }
            None => self.err("unexpected end of PTX"),
        }
    }
    fn is_p(&self, c: char) -> bool {
        self.peek() == Some(&Tok::P(c))
    }
    fn expect_p(&mut self, c: char) -> Result<(), Error> {
        if self.is_p(c) {
            self.i += 1;
            Ok(())
        } else {
            self.err(format!("expected '{c}', found {:?}", self.peek()))
        }
    }
    fn ident(&mut self) -> Result<String, Error> {
        match self.next()? {
            Tok::Id(s) => Ok(s),
            t => {
                self.i -= 1;
                self.err(format!("expected identifier, found {t:?}"))
            }
        }
    }
    fn int(&mut self) -> Result<i128, Error> {
        let neg = if self.is_p('-') {
            self.i += 1;
            true
        } else {
            false
        };
        match self.next()? {
            Tok::Int(v) => Ok(if neg { -v } else { v }),
            t => {
                self.i -= 1;
                self.err(format!("expected integer, found {t:?}"))
            }
        }
    }
    fn skip_to(&mut self, c: char) -> Result<(), Error> {
        while !self.is_p(c) {
            self.next()?;
        }
        self.i += 1;
        Ok(())
    }

    fn module(&mut self) -> Result<(), Error> {
        while let Some(t) = self.peek().cloned() {
            let Tok::Id(d) = t else { return self.err(format!("unexpected {t:?} at module scope")) };
            self.i += 1;
            match d.as_str() {
                ".version" | ".address_size" => {
                    self.next()?;
                }
                ".target" => {
                    self.ident()?;
                    while self.is_p(',') {
                        self.i += 1;
                        self.ident()?;
                    }
                }
                ".visible" | ".extern" | ".weak" | ".common" => {}
                ".entry" => self.function(true)?,
                ".func" => self.function(false)?,
                ".global" | ".const" => self.global_var()?,
                ".shared" => {
                    let (name, size, align) = self.var_decl()?;
                    self.add_shared(name, size, align);
                    self.expect_p(';')?;
                }
                ".file" => {
                    self.next()?;
                    self.next()?;
                    while self.is_p(',') {
                        self.i += 1;
                        self.next()?;
                    }
                }
                ".section" => {
                    self.ident()?;
                    self.expect_p('{')?;
                    let mut depth = 1;
                    while depth > 0 {
                        match self.next()? {
                            Tok::P('{') => depth += 1,
                            Tok::P('}') => depth -= 1,
                            _ => {}
                        }
                    }
                }
                ".pragma" | ".alias" => self.skip_to(';')?,
                _ => return Err(Error::Parse { line: self.t[self.i - 1].1, msg: format!("unsupported module directive {d}") }),
            }
        }
        Ok(())
    }

    fn add_shared(&mut self, name: String, size: u64, align: u64) {
        // extern (dynamic) shared arrays have size 0 and start at the end of static shared
        // memory at launch; they are resolved to offset u32::MAX - align and fixed up at run
        // time (see exec: DYN_SHARED).
        if size == 0 {
            self.shared.insert(name, crate::exec::DYN_SHARED);
            return;
        }
        let off = align_up(self.m.shared_static as u64, align) as u32;
        self.m.shared_static = off + size as u32;
        self.shared.insert(name, off);
    }

    /// `[.align N] .type name[dims]...` (after the state-space directive). Returns (name, bytes, align).
    fn var_decl(&mut self) -> Result<(String, u64, u64), Error> {
        let mut align = 0u64;
        let mut ty = None;
        let mut vec = 1u64;
        loop {
            let id = self.ident()?;
            if id == ".align" {
                align = self.int()? as u64;
            } else if let Some(t) = id.strip_prefix('.').and_then(Ty::parse) {
                ty = Some(t);
            } else if id == ".v2" || id == ".v4" || id == ".v8" {
                vec = id[2..].parse().unwrap();
            } else if id.starts_with('.') {
                // .ptr, .global etc.: ignore attributes
            } else {
                let Some(t) = ty else { return self.err(format!("declaration of {id} without a type")) };
                let mut n = 1u64;
                let mut unsized_ = false;
                while self.is_p('[') {
                    self.i += 1;
                    if self.is_p(']') {
                        unsized_ = true;
                    } else {
                        n *= self.int()? as u64;
                    }
                    self.expect_p(']')?;
                }
                let el = t.bytes() as u64 * vec;
                let align = if align == 0 { el } else { align };
                return Ok((id, if unsized_ { 0 } else { n * el }, align));
            }
        }
    }

    fn global_var(&mut self) -> Result<(), Error> {
        let start = self.i;
        let (name, size, align) = self.var_decl()?;
        // recover the element type for the initialiser
        let mut ty = Ty::B8;
        for k in start..self.i {
            if let Tok::Id(s) = &self.t[k].0 {
                if let Some(t) = s.strip_prefix('.').and_then(Ty::parse) {
                    ty = t;
                }
            }
        }
        let mut init = Vec::new();
        if self.is_p('=') {
            self.i += 1;
            self.initializer(ty, &mut init)?;
        }
        self.expect_p(';')?;
        let size = size.max(init.len() as u64);
        init.resize(size as usize, 0);
        self.gsyms.insert(name.clone(), self.m.globals.len() as u32);
        self.m.globals.push(GlobalVar { name, size, align, init });
        Ok(())
    }

    fn initializer(&mut self, ty: Ty, out: &mut Vec<u8>) -> Result<(), Error> {
        if self.is_p('{') {
            self.i += 1;
            loop {
                if self.is_p('}') {
                    self.i += 1;
                    return Ok(());
                }
                self.initializer(ty, out)?;
                if self.is_p(',') {
                    self.i += 1;
                }
            }
        }
        let neg = if self.is_p('-') {
            self.i += 1;
            true
        } else {
            false
        };
        let v: u64 = match self.next()? {
            Tok::Int(v) => {
                let v = if neg { -v } else { v };
                match ty {
                    Ty::F32 => (v as f32).to_bits() as u64,
                    Ty::F64 => (v as f64).to_bits(),
                    _ => v as u64,
                }
            }
            Tok::F32(b) => b as u64,
            Tok::F64(b) => b,
            Tok::Float(f) => {
                let f = if neg { -f } else { f };
                if ty == Ty::F32 { (f as f32).to_bits() as u64 } else { f.to_bits() }
            }
            t => return self.err(format!("unsupported initialiser {t:?}")),
        };
        out.extend_from_slice(&v.to_le_bytes()[..ty.bytes() as usize]);
        Ok(())
    }

    /// Parameter list `( .param ... , ... )` into decls; `base` is the starting offset.
    fn params(&mut self, base: u32) -> Result<(Vec<ParamDecl>, u32), Error> {
        let mut v = Vec::new();
        let mut off = base as u64;
        self.expect_p('(')?;
        while !self.is_p(')') {
            let d = self.ident()?;
            if d != ".param" && d != ".reg" {
                return self.err(format!("expected .param, found {d}"));
            }
            let (name, size, align) = self.var_decl()?;
            off = align_up(off, align);
            v.push(ParamDecl { name, offset: off as u32, size: size as u32 });
            off += size;
            if self.is_p(',') {
                self.i += 1;
            }
        }
        self.i += 1;
        Ok((v, off as u32))
    }

    fn function(&mut self, entry: bool) -> Result<(), Error> {
        let mut rets = Vec::new();
        let mut off = 0u32;
        if !entry && self.is_p('(') {
            let (r, o) = self.params(0)?;
            rets = r;
            off = o;
        }
        let name = self.ident()?;
        let (params, end) = if self.is_p('(') { self.params(if entry { 0 } else { off })? } else { (Vec::new(), off) };
        // performance directives up to '{' or ';'
        while !self.is_p('{') && !self.is_p(';') {
            self.next()?;
        }
        let idx = match self.m.func_idx.get(&name) {
            Some(&i) => i,
            None => {
                self.m.funcs.push(Func {
                    name: name.clone(),
                    entry,
                    start: 0,
                    nregs: 0,
                    params: Vec::new(),
                    rets: Vec::new(),
                    param_size: 0,
                    fparam_size: 0,
                    local_size: 0,
                    defined: false,
                    callees: Vec::new(),
                });
                let i = self.m.funcs.len() as u32 - 1;
                self.m.func_idx.insert(name.clone(), i);
                i
            }
        };
        {
            let f = &mut self.m.funcs[idx as usize];
            f.params = params.clone();
            f.rets = rets.clone();
            if entry {
                f.param_size = end;
            }
        }
        if self.is_p(';') {
            self.i += 1;
            return Ok(());
        }
        self.expect_p('{')?;
        let mut ctx = FnCtx { scopes: vec![HashMap::new()], nregs: 1, local: 0, fparam: if entry { 0 } else { end }, labels: HashMap::new(), pending: Vec::new() };
        for p in &params {
            ctx.scopes[0].insert(p.name.clone(), if entry { Sym::KParam(p.offset) } else { Sym::FParam(p.offset, p.size) });
        }
        for p in &rets {
            ctx.scopes[0].insert(p.name.clone(), Sym::FParam(p.offset, p.size));
        }
        let start = self.m.code.len() as u32;
        self.body(&mut ctx)?;
        if self.m.code.len() as u32 == start || !matches!(self.m.code.last().unwrap().op, Op::Ret | Op::Exit | Op::Bra { .. }) {
            let line = self.line();
            self.m.code.push(Inst { op: if entry { Op::Exit } else { Op::Ret }, guard: None, line, class: Class::Branch });
        }
        for (pc, l, line) in std::mem::take(&mut ctx.pending) {
            let Some(&t) = ctx.labels.get(&l) else { return Err(Error::Parse { line, msg: format!("unknown label {l}") }) };
            if let Op::Bra { t: tt } = &mut self.m.code[pc as usize].op {
                *tt = t;
            }
        }
        let f = &mut self.m.funcs[idx as usize];
        f.start = start;
        f.nregs = ctx.nregs.max(1);
        f.fparam_size = ctx.fparam;
        f.local_size = ctx.local;
        f.defined = true;
        Ok(())
    }

    fn body(&mut self, ctx: &mut FnCtx) -> Result<(), Error> {
        loop {
            let line = self.line();
            let t = self.next()?;
            match t {
                Tok::P('}') => {
                    ctx.scopes.pop();
                    if ctx.scopes.is_empty() {
                        return Ok(());
                    }
                }
                Tok::P('{') => ctx.scopes.push(HashMap::new()),
                Tok::P('@') => {
                    let neg = if self.is_p('!') {
                        self.i += 1;
                        true
                    } else {
                        false
                    };
                    let p = self.ident()?;
                    let r = match self.lookup(ctx, &p) {
                        Some(Sym::Reg(r)) => r,
                        _ => return self.err(format!("unknown predicate {p}")),
                    };
                    let op = self.ident()?;
                    self.instruction(ctx, &op, Some((r, neg)), line)?;
                }
                Tok::Id(s) if self.is_p(':') => {
                    self.i += 1;
                    ctx.labels.insert(s, self.m.code.len() as u32);
                }
                Tok::Id(s) if s == ".reg" => self.reg_decl(ctx)?,
                Tok::Id(s) if s == ".local" => {
                    let (name, size, align) = self.var_decl()?;
                    let off = align_up(ctx.local as u64, align) as u32;
                    ctx.local = off + size as u32;
                    ctx.scopes.last_mut().unwrap().insert(name, Sym::Local(off));
                    self.expect_p(';')?;
                }
                Tok::Id(s) if s == ".shared" => {
                    let (name, size, align) = self.var_decl()?;
                    self.add_shared(name, size, align);
                    self.expect_p(';')?;
                }
                Tok::Id(s) if s == ".param" => {
                    let (name, size, align) = self.var_decl()?;
                    let off = align_up(ctx.fparam as u64, align) as u32;
                    ctx.fparam = off + size as u32;
                    ctx.scopes.last_mut().unwrap().insert(name, Sym::FParam(off, size as u32));
                    self.expect_p(';')?;
                }
                Tok::Id(s) if s == ".pragma" => self.skip_to(';')?,
                Tok::Id(s) if s == ".loc" => {
                    // .loc file line col [, function_name label [+ off], inlined_at ...]
                    self.next()?;
                    self.next()?;
                    self.next()?;
                    while self.is_p(',') {
                        self.i += 1;
                        self.next()?;
                        while !self.is_p(',') && !matches!(self.peek(), Some(Tok::Id(x)) if x.starts_with('.') || x.contains('.') || self.t[self.i].1 != line) {
                            self.next()?;
                        }
                    }
                }
                Tok::Id(s) if s.starts_with('.') => return Err(Error::Parse { line, msg: format!("unsupported directive {s} in function body") }),
                Tok::Id(s) => self.instruction(ctx, &s, None, line)?,
                t => return Err(Error::Parse { line, msg: format!("unexpected {t:?}") }),
            }
        }
    }

    fn reg_decl(&mut self, ctx: &mut FnCtx) -> Result<(), Error> {
        loop {
            let id = self.ident()?;
            if id.starts_with('.') {
                if id.starts_with(".v") {
                    return self.err("vector register declarations are not supported");
                }
                continue;
            }
            if self.is_p('<') {
                self.i += 1;
                let n = self.int()?;
                if n < 0 || ctx.nregs as i128 + n > MAX_REGS as i128 {
                    return self.err(&format!("register declaration %{id}<{n}> exceeds {MAX_REGS} registers per function"));
                }
                let n = n as u32;
                self.expect_p('>')?;
                for k in 0..n {
                    ctx.scopes.last_mut().unwrap().insert(format!("{id}{k}"), Sym::Reg(ctx.nregs));
                    ctx.nregs += 1;
                }
            } else {
                if ctx.nregs >= MAX_REGS {
                    return self.err(&format!("more than {MAX_REGS} registers in one function"));
                }
                ctx.scopes.last_mut().unwrap().insert(id, Sym::Reg(ctx.nregs));
                ctx.nregs += 1;
            }
            if self.is_p(',') {
                self.i += 1;
                continue;
            }
            return self.expect_p(';');
        }
    }

    fn lookup(&self, ctx: &FnCtx, name: &str) -> Option<Sym> {
        for s in ctx.scopes.iter().rev() {
            if let Some(v) = s.get(name) {
                return Some(*v);
            }
        }
        if let Some(&o) = self.shared.get(name) {
            return Some(Sym::Shared(o));
        }
        self.gsyms.get(name).map(|&g| Sym::Global(g))
    }

    fn raw(&mut self) -> Result<Raw, Error> {
        if self.is_p('[') {
            self.i += 1;
            let mut base = None;
            let mut off = 0i64;
            match self.next()? {
                Tok::Id(s) => base = Some(Box::new(Raw::Name(s))),
                Tok::Int(v) => off = v as i64,
                t => return self.err(format!("bad address {t:?}")),
            }
            while self.is_p('+') || self.is_p('-') {
                let neg = self.is_p('-');
                self.i += 1;
                let v = self.int()? as i64;
                off += if neg { -v } else { v };
            }
            self.expect_p(']')?;
            return Ok(Raw::Addr(base, off));
        }
        if self.is_p('{') || self.is_p('(') {
            let close = if self.is_p('{') { '}' } else { ')' };
            self.i += 1;
            let mut v = Vec::new();
            while !self.is_p(close) {
                v.push(self.raw()?);
                if self.is_p(',') {
                    self.i += 1;
                }
            }
            self.i += 1;
            return Ok(if close == '}' { Raw::Vec(v) } else { Raw::List(v) });
        }
        if self.is_p('!') {
            self.i += 1;
            return Ok(Raw::Not(self.ident()?));
        }
        if self.is_p('-') {
            self.i += 1;
            return Ok(match self.next()? {
                Tok::Int(v) => Raw::Imm(Tok::Int(-v)),
                Tok::Float(f) => Raw::Imm(Tok::Float(-f)),
                t => return self.err(format!("bad negative operand {t:?}")),
            });
        }
        match self.next()? {
            Tok::Id(s) if s == "_" => Ok(Raw::Sink),
            Tok::Id(s) => {
                if self.is_p('|') {
                    self.i += 1;
                    let q = self.ident()?;
                    return Ok(Raw::Pair(s, q));
                }
                Ok(Raw::Name(s))
            }
            t @ (Tok::Int(_) | Tok::F32(_) | Tok::F64(_) | Tok::Float(_)) => Ok(Raw::Imm(t)),
            t => self.err(format!("bad operand {t:?}")),
        }
    }

    fn instruction(&mut self, ctx: &mut FnCtx, opc: &str, guard: Option<(Reg, bool)>, line: u32) -> Result<(), Error> {
        let mut ops = Vec::new();
        while !self.is_p(';') {
            ops.push(self.raw()?);
            if self.is_p(',') {
                self.i += 1;
            }
        }
        self.i += 1;
        let pc = self.m.code.len() as u32;
        let mut d = Dec { p: self, ctx };
        let (op, class) = d.decode(opc, &ops).map_err(|msg| Error::Parse { line, msg: format!("{opc}: {msg}") })?;
        match &op {
            Op::Bra { .. } => {
                let Some(Raw::Name(l)) = ops.last() else { return Err(Error::Parse { line, msg: "bra without label".into() }) };
                ctx.pending.push((pc, l.clone(), line));
            }
            Op::Call { .. } => {
                let name = ops.iter().find_map(|r| if let Raw::Name(n) = r { Some(n.clone()) } else { None }).unwrap_or_default();
                self.pending_calls.push((pc, name, line));
            }
            _ => {}
        }
        self.m.code.push(Inst { op, guard, line, class });
        Ok(())
    }
}

struct Dec<'a> {
    p: &'a mut Parser,
    ctx: &'a mut FnCtx,
}

fn sreg(name: &str) -> Option<Sreg> {
    let dim = |s: &str| match s {
        "x" => Some(0u8),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    let (base, d) = match name.split_once('.') {
        Some((b, d)) => (b, dim(d)),
        None => (name, None),
    };
    Some(match (base, d) {
        ("%tid", Some(d)) => Sreg::Tid(d),
        ("%ntid", Some(d)) => Sreg::Ntid(d),
        ("%ctaid", Some(d)) => Sreg::Ctaid(d),
        ("%nctaid", Some(d)) => Sreg::Nctaid(d),
        ("%laneid", None) => Sreg::Laneid,
        ("%warpid", None) => Sreg::Warpid,
        ("%nwarpid", None) => Sreg::Nwarpid,
        ("%lanemask_eq", None) => Sreg::LanemaskEq,
        ("%lanemask_lt", None) => Sreg::LanemaskLt,
        ("%lanemask_le", None) => Sreg::LanemaskLe,
        ("%lanemask_gt", None) => Sreg::LanemaskGt,
        ("%lanemask_ge", None) => Sreg::LanemaskGe,
        ("%clock", None) => Sreg::Clock,
        ("%clock64", None) => Sreg::Clock64,
        ("%smid", None) => Sreg::Smid,
        ("%dynamic_smem_size", None) => Sreg::DynSmem,
        ("%total_smem_size", None) => Sreg::TotalSmem,
        _ => return None,
    })
}

fn imm_bits(t: &Tok, ty: Option<Ty>) -> u64 {
    match (t, ty) {
        (Tok::Int(v), Some(Ty::F32)) => (*v as f32).to_bits() as u64,
        (Tok::Int(v), Some(Ty::F64)) => (*v as f64).to_bits(),
        (Tok::Int(v), _) => *v as u64,
        (Tok::F32(b), Some(Ty::F64)) => (f32::from_bits(*b) as f64).to_bits(),
        (Tok::F32(b), _) => *b as u64,
        (Tok::F64(b), Some(Ty::F32)) => (f64::from_bits(*b) as f32).to_bits() as u64,
        (Tok::F64(b), _) => *b,
        (Tok::Float(f), Some(Ty::F32)) => (*f as f32).to_bits() as u64,
        (Tok::Float(f), _) => f.to_bits(),
        _ => 0,
    }
}

type R<T> = Result<T, String>;

impl Dec<'_> {
    fn sym(&self, n: &str) -> R<Sym> {
        self.p.lookup(self.ctx, n).ok_or_else(|| format!("unknown symbol {n}"))
    }
    fn dst(&self, r: &Raw) -> R<Reg> {
        match r {
            Raw::Name(n) => match self.sym(n)? {
                Sym::Reg(r) => Ok(r),
                _ => Err(format!("{n} is not a register")),
            },
            Raw::Sink => Ok(self.sink()),
            _ => Err(format!("bad destination {r:?}")),
        }
    }
    fn sink(&self) -> Reg {
        // register 0 of every function is reserved as the `_` sink
        0
    }
    fn src(&self, r: &Raw, ty: Option<Ty>) -> R<Src> {
        match r {
            Raw::Imm(t) => Ok(Src::I(imm_bits(t, ty))),
            Raw::Name(n) => {
                if let Some(s) = sreg(n) {
                    return Ok(Src::S(s));
                }
                Ok(match self.sym(n)? {
                    Sym::Reg(r) => Src::R(r),
                    Sym::Shared(o) => Src::I(o as u64),
                    Sym::Global(g) => Src::G(g),
                    Sym::Local(o) => Src::L(o),
                    Sym::KParam(o) => Src::I(o as u64),
                    Sym::FParam(o, _) => Src::I(o as u64),
                })
            }
            _ => Err(format!("bad source operand {r:?}")),
        }
    }
    /// Address operand and the state space it resolves to.
    fn addr(&self, r: &Raw, sp: Space) -> R<(Space, Addr)> {
        let Raw::Addr(base, off) = r else { return Err(format!("expected address, found {r:?}")) };
        let Some(base) = base else { return Ok((sp, Addr { base: Src::I(0), off: *off })) };
        let Raw::Name(n) = &**base else { return Err("bad address base".into()) };
        let s = self.sym(n)?;
        Ok(match s {
            Sym::Reg(r) => (if sp == Space::Param { Space::Param } else { sp }, Addr { base: Src::R(r), off: *off }),
            Sym::KParam(o) => (Space::Param, Addr { base: Src::I(o as u64), off: *off }),
            Sym::FParam(o, _) => (Space::FParam, Addr { base: Src::I(o as u64), off: *off }),
            Sym::Shared(o) => {
                if sp == Space::Generic {
                    (Space::Generic, Addr { base: Src::I(o as u64 | crate::exec::SHARED_WIN), off: *off })
                } else {
                    (Space::Shared, Addr { base: Src::I(o as u64), off: *off })
                }
            }
            Sym::Global(g) => (if sp == Space::Const { Space::Const } else { Space::Global }, Addr { base: Src::G(g), off: *off }),
            Sym::Local(o) => (if sp == Space::Generic { Space::Generic } else { Space::Local }, Addr { base: Src::L(o), off: *off }),
        })
    }

    fn decode(&mut self, opc: &str, ops: &[Raw]) -> R<(Op, Class)> {
        let parts: Vec<&str> = opc.split('.').collect();
        let name = parts[0];
        let mods = &parts[1..];
        let has = |s: &str| mods.contains(&s);
        let ty = mods.iter().rev().find_map(|s| Ty::parse(s));
        let space = || {
            for m in mods {
                match *m {
                    "global" => return Space::Global,
                    "shared" | "shared::cta" => return Space::Shared,
                    "local" => return Space::Local,
                    "param" => return Space::Param,
                    "const" => return Space::Const,
                    _ => {}
                }
            }
            Space::Generic
        };
        let n = ops.len();
        let need = |k: usize| if n < k { Err(format!("expected {k} operands, found {n}")) } else { Ok(()) };
        match name {
            "mov" => {
                need(2)?;
                let t = ty.ok_or("mov without type")?;
                let bits = t.bytes() * 8;
                match (&ops[0], &ops[1]) {
                    (Raw::Vec(ds), a) => {
                        let ds = ds.iter().map(|r| if matches!(r, Raw::Sink) { Ok(None) } else { self.dst(r).map(Some) }).collect::<R<Vec<_>>>()?;
                        let k = ds.len() as u32;
                        Ok((Op::Unpack { ds: ds.into(), a: self.src(a, None)?, bits: bits / k }, Class::Mov))
                    }
                    (d, Raw::Vec(parts)) => {
                        let k = parts.len() as u32;
                        let parts = parts.iter().map(|r| self.src(r, None)).collect::<R<Vec<_>>>()?;
                        Ok((Op::Pack { d: self.dst(d)?, parts: parts.into(), bits: bits / k }, Class::Mov))
                    }
                    (d, a) => {
                        let mask = if t == Ty::Pred { 1 } else if bits >= 64 { !0 } else { (1u64 << bits) - 1 };
                        Ok((Op::Mov { d: self.dst(d)?, a: self.src(a, ty)?, mask }, Class::Mov))
                    }
                }
            }
            "ld" | "ldu" => {
                need(2)?;
                let t = ty.ok_or("ld without type")?;
                let (sp, addr) = self.addr(&ops[1], space())?;
                let ds: Vec<Option<Reg>> = match &ops[0] {
                    Raw::Vec(v) => v.iter().map(|r| if matches!(r, Raw::Sink) { Ok(None) } else { self.dst(r).map(Some) }).collect::<R<_>>()?,
                    r => vec![Some(self.dst(r)?)],
                };
                Ok((Op::Ld { sp, size: t.bytes() as u8, signed: t.signed(), ds: ds.into(), addr }, Class::Load))
            }
            "st" => {
                need(2)?;
                let t = ty.ok_or("st without type")?;
                let (sp, addr) = self.addr(&ops[0], space())?;
                let vals: Vec<Src> = match &ops[1] {
                    Raw::Vec(v) => v.iter().map(|r| self.src(r, ty)).collect::<R<_>>()?,
                    r => vec![self.src(r, ty)?],
                };
                Ok((Op::St { sp, size: t.bytes() as u8, vals: vals.into(), addr }, Class::Store))
            }
            "atom" | "red" => {
                let t = ty.ok_or("atom without type")?;
                let op = mods.iter().find_map(|m| match *m {
                    "add" => Some(AtomOp::Add),
                    "min" => Some(AtomOp::Min),
                    "max" => Some(AtomOp::Max),
                    "inc" => Some(AtomOp::Inc),
                    "dec" => Some(AtomOp::Dec),
                    "and" => Some(AtomOp::And),
                    "or" => Some(AtomOp::Or),
                    "xor" => Some(AtomOp::Xor),
                    "exch" => Some(AtomOp::Exch),
                    "cas" => Some(AtomOp::Cas),
                    _ => None,
                }).ok_or("unknown atomic op")?;
                if has("v2") || has("v4") || has("v8") {
                    return Err("vector atomics are not supported".into());
                }
                need(if name == "atom" { 3 } else { 2 })?;
                let (d, rest) = if name == "atom" { (Some(self.dst(&ops[0])?), &ops[1..]) } else { (None, ops) };
                if rest.len() < 2 {
                    return Err("missing atomic operands".into());
                }
                let (sp, addr) = self.addr(&rest[0], space())?;
                let b = self.src(&rest[1], ty)?;
                let c = if op == AtomOp::Cas { self.src(rest.get(2).ok_or("cas needs 3 sources")?, ty)? } else { Src::I(0) };
                Ok((Op::Atom { sp, op, ty: t, d, addr, b, c }, Class::Atomic))
            }
            "cvta" => {
                need(2)?;
                let to = has("to");
                let sp = space();
                Ok((Op::Cvta { to, sp, d: self.dst(&ops[0])?, a: self.src(&ops[1], None)? }, Class::Int))
            }
            "cvt" => {
                need(2)?;
                let tys: Vec<Ty> = mods.iter().filter_map(|s| Ty::parse(s)).collect();
                if tys.len() != 2 {
                    return Err("cvt needs two types".into());
                }
                let rnd = mods.iter().find_map(|m| match *m {
                    "rn" | "rni" => Some(Rnd::N),
                    "rz" | "rzi" => Some(Rnd::Z),
                    "rm" | "rmi" => Some(Rnd::M),
                    "rp" | "rpi" => Some(Rnd::P),
                    _ => None,
                });
                let int_rnd = mods.iter().any(|m| m.len() == 3 && m.starts_with('r') && m.ends_with('i'));
                if matches!(tys[0], Ty::BF16x2 | Ty::F16x2) {
                    need(3)?;
                    return Ok((Op::CvtPack { d: self.dst(&ops[0])?, a: self.src(&ops[1], Some(Ty::F32))?, b: self.src(&ops[2], Some(Ty::F32))?, bf: tys[0] == Ty::BF16x2, relu: has("relu"), rnd: rnd.unwrap_or(Rnd::N) }, Class::Cvt));
                }
                let spec = CvtSpec { dst: tys[0], src: tys[1], rnd, int_rnd, ftz: has("ftz"), sat: has("sat"), relu: has("relu") };
                Ok((Op::Cvt { d: self.dst(&ops[0])?, a: self.src(&ops[1], Some(tys[1]))?, spec }, Class::Cvt))
            }
            "setp" => {
                need(3)?;
                let t = ty.ok_or("setp without type")?;
                let cmp = mods.iter().find_map(|m| alu::cmp_code(m)).ok_or("setp without compare op")?;
                let m = (cmp << 4) | if has("ftz") { alu::M_FTZ } else { 0 };
                let (d, dn) = match &ops[0] {
                    Raw::Pair(a, b) => (self.dst(&Raw::Name(a.clone()))?, Some(self.dst(&Raw::Name(b.clone()))?)),
                    r => (self.dst(r)?, None),
                };
                let comb = if n >= 4 {
                    let bop = if has("and") { BoolOp::And } else if has("or") { BoolOp::Or } else if has("xor") { BoolOp::Xor } else { return Err("setp with 4 operands needs .and/.or/.xor".into()) };
                    let (c, neg) = match &ops[3] {
                        Raw::Not(p) => (self.src(&Raw::Name(p.clone()), None)?, true),
                        r => (self.src(r, None)?, false),
                    };
                    Some((bop, c, neg))
                } else {
                    None
                };
                Ok((Op::Setp { f: alu::setp_fn(t)?, m, d, dn, a: self.src(&ops[1], ty)?, b: self.src(&ops[2], ty)?, comb }, Class::Int))
            }
            "selp" => {
                need(4)?;
                Ok((Op::Selp { d: self.dst(&ops[0])?, a: self.src(&ops[1], ty)?, b: self.src(&ops[2], ty)?, p: self.src(&ops[3], None)? }, Class::Int))
            }
            "bra" | "brx" => Ok((Op::Bra { t: 0 }, Class::Branch)),
            "ret" => Ok((Op::Ret, Class::Branch)),
            "exit" => Ok((Op::Exit, Class::Branch)),
            "trap" | "brkpt" => Ok((Op::Trap, Class::Other)),
            "membar" | "fence" | "prefetch" | "prefetchu" | "nanosleep" | "pmevent" | "griddepcontrol" => Ok((Op::Nop, Class::Other)),
            "bar" | "barrier" => {
                if has("warp") {
                    // bar.warp.sync membermask
                    need(1)?;
                    return Ok((Op::WarpSync { mask: self.src(&ops[0], None)? }, Class::Barrier));
                }
                let arrive = has("arrive");
                if has("red") {
                    // bar.red.{popc,and,or}.{u32,pred} d, id, [cnt,] p
                    let kind = if has("popc") { 0 } else if has("and") { 1 } else { 2 };
                    need(3)?;
                    let d = self.dst(&ops[0])?;
                    let (cnt, p) = if n == 4 { (Some(self.src(&ops[2], None)?), &ops[3]) } else { (None, &ops[2]) };
                    let (ps, neg) = match p {
                        Raw::Not(x) => (self.src(&Raw::Name(x.clone()), None)?, true),
                        r => (self.src(r, None)?, false),
                    };
                    return Ok((Op::Bar { id: self.src(&ops[1], None)?, cnt, arrive: false, red: Some((kind, d, ps, neg)) }, Class::Barrier));
                }
                let id = if n >= 1 { self.src(&ops[0], None)? } else { Src::I(0) };
                let cnt = if n >= 2 { Some(self.src(&ops[1], None)?) } else { None };
                if arrive && cnt.is_none() {
                    return Err("bar.arrive needs a thread count".into());
                }
                Ok((Op::Bar { id, cnt, arrive, red: None }, Class::Barrier))
            }
            "shfl" => {
                need(5)?;
                let mode = if has("idx") { ShflMode::Idx } else if has("up") { ShflMode::Up } else if has("down") { ShflMode::Down } else if has("bfly") { ShflMode::Bfly } else { return Err("shfl mode".into()) };
                let (d, dp) = match &ops[0] {
                    Raw::Pair(a, b) => (self.dst(&Raw::Name(a.clone()))?, Some(self.dst(&Raw::Name(b.clone()))?)),
                    r => (self.dst(r)?, None),
                };
                Ok((Op::Shfl { mode, d, dp, a: self.src(&ops[1], None)?, b: self.src(&ops[2], None)?, c: self.src(&ops[3], None)?, mask: self.src(&ops[4], None)? }, Class::Warp))
            }
            "vote" => {
                need(3)?;
                let mode = if has("all") { VoteMode::All } else if has("any") { VoteMode::Any } else if has("uni") { VoteMode::Uni } else { VoteMode::Ballot };
                let (a, neg) = match &ops[1] {
                    Raw::Not(p) => (self.src(&Raw::Name(p.clone()), None)?, true),
                    r => (self.src(r, None)?, false),
                };
                Ok((Op::Vote { mode, d: self.dst(&ops[0])?, a, neg, mask: self.src(&ops[2], None)? }, Class::Warp))
            }
            "activemask" => {
                need(1)?;
                Ok((Op::Activemask { d: self.dst(&ops[0])? }, Class::Warp))
            }
            "redux" => {
                need(3)?;
                let op = if has("add") { AtomOp::Add } else if has("min") { AtomOp::Min } else if has("max") { AtomOp::Max } else if has("and") { AtomOp::And } else if has("or") { AtomOp::Or } else if has("xor") { AtomOp::Xor } else { return Err("redux op".into()) };
                if ty.map(|t| t.is_float()).unwrap_or(false) {
                    return Err("float redux is not supported".into());
                }
                Ok((Op::Redux { op, signed: ty.map(|t| t.signed()).unwrap_or(false), d: self.dst(&ops[0])?, a: self.src(&ops[1], None)?, mask: self.src(&ops[2], None)? }, Class::Warp))
            }
            "match" => {
                need(3)?;
                let (d, dp) = match &ops[0] {
                    Raw::Pair(a, b) => (self.dst(&Raw::Name(a.clone()))?, Some(self.dst(&Raw::Name(b.clone()))?)),
                    r => (self.dst(r)?, None),
                };
                Ok((Op::Match { all: has("all"), wide: ty.map(|t| t.bytes() == 8).unwrap_or(false), d, dp, a: self.src(&ops[1], None)?, mask: self.src(&ops[2], None)? }, Class::Warp))
            }
            "call" => {
                // call{.uni} (rets), func, (args);  or  call func, (args);  or call func;
                let mut rets = Vec::new();
                let mut args = Vec::new();
                let mut seen_name = false;
                for r in ops {
                    match r {
                        Raw::List(v) => {
                            for x in v {
                                let Raw::Name(nm) = x else { return Err("call arguments must be param symbols".into()) };
                                let Sym::FParam(o, s) = self.sym(nm)? else { return Err(format!("call argument {nm} is not a .param")) };
                                if seen_name {
                                    args.push((o, s));
                                } else {
                                    rets.push(o);
                                }
                            }
                        }
                        Raw::Name(_) => seen_name = true,
                        _ => return Err("bad call operand".into()),
                    }
                }
                Ok((Op::Call { func: 0, rets: rets.into(), args: args.into() }, Class::Branch))
            }
            "mma" => self.mma(mods, ops),
            "ldmatrix" | "stmatrix" => {
                need(2)?;
                let num = if has("x4") { 4 } else if has("x2") { 2 } else { 1 };
                let trans = has("trans");
                if name == "ldmatrix" {
                    let Raw::Vec(v) = &ops[0] else { return Err("ldmatrix destination must be a vector".into()) };
                    if v.len() != num as usize {
                        return Err("ldmatrix destination count".into());
                    }
                    let mut ds = [0; 4];
                    for (k, r) in v.iter().enumerate() {
                        ds[k] = self.dst(r)?;
                    }
                    let (sp, addr) = self.addr(&ops[1], space())?;
                    Ok((Op::Ldmatrix { num, trans, ds, addr, sp }, Class::Load))
                } else {
                    let Raw::Vec(v) = &ops[1] else { return Err("stmatrix source must be a vector".into()) };
                    let mut vals = [Src::I(0); 4];
                    for (k, r) in v.iter().enumerate().take(4) {
                        vals[k] = self.src(r, None)?;
                    }
                    let (sp, addr) = self.addr(&ops[0], space())?;
                    Ok((Op::Stmatrix { num, trans, vals, addr, sp }, Class::Store))
                }
            }
            "cp" => {
                if has("commit_group") {
                    return Ok((Op::CpCommit, Class::AsyncCopy));
                }
                if has("wait_group") {
                    let Some(Raw::Imm(Tok::Int(k))) = ops.first() else { return Err("wait_group count".into()) };
                    return Ok((Op::CpWait { n: *k as u32 }, Class::AsyncCopy));
                }
                if has("wait_all") {
                    return Ok((Op::CpWait { n: u32::MAX }, Class::AsyncCopy));
                }
                if !has("async") {
                    return Err("unsupported cp form".into());
                }
                need(3)?;
                let (_, dst) = self.addr(&ops[0], Space::Shared)?;
                let (_, src) = self.addr(&ops[1], Space::Global)?;
                let size = match &ops[2] {
                    Raw::Imm(Tok::Int(v)) => *v as u8,
                    _ => return Err("cp.async size must be immediate".into()),
                };
                // optional src-size, then an optional cache policy (with .L2::cache_hint)
                let hint = mods.iter().any(|m| m.contains("cache_hint"));
                let src_size = if n >= 4 && !(hint && n == 4) { Some(self.src(&ops[3], None)?) } else { None };
                Ok((Op::CpAsync { dst, src, size, src_size }, Class::AsyncCopy))
            }
            _ => {
                let Some((f, mut m, nsrc, class)) = alu::decode(name, mods)? else { return Err("unsupported instruction".into()) };
                need(nsrc + 1)?;
                let d = self.dst(&ops[0])?;
                let a = self.src(&ops[1], ty)?;
                let mut b = if nsrc >= 2 { self.src(&ops[2], if matches!(name, "shl" | "shr") { Some(Ty::U32) } else { ty })? } else { Src::I(0) };
                let mut c = if nsrc >= 3 { self.src(&ops[3], ty)? } else { Src::I(0) };
                if name == "lop3" {
                    need(5)?;
                    let Raw::Imm(Tok::Int(lut)) = &ops[4] else { return Err("lop3 lut must be immediate".into()) };
                    // pass the lut in the high half of c (c is 32-bit)
                    c = match c {
                        Src::I(v) => Src::I((v & 0xffff_ffff) | ((*lut as u64) << 32)),
                        Src::R(r) => {
                            return Ok((Op::Alu { f: lop3_dispatch(*lut as u8), m, d, a, b, c: Src::R(r) }, class));
                        }
                        _ => return Err("lop3 operand".into()),
                    };
                }
                if name == "bfi" {
                    need(5)?;
                    // bfi d, a, b, pos, len: pack pos and len into c when both are immediates,
                    // else use the register form
                    let pos = self.src(&ops[3], Some(Ty::U32))?;
                    let len = self.src(&ops[4], Some(Ty::U32))?;
                    match (pos, len) {
                        (Src::I(p), Src::I(l)) => c = Src::I((p & 0xffff_ffff) | (l << 32)),
                        _ => {
                            return Ok((Op::Alu { f: if ty.map(|t| t.bytes()) == Some(8) { bfi64_reg } else { bfi32_reg }, m, d, a, b, c: pack_hint(pos, len, &mut b)? }, class));
                        }
                    }
                }
                if name == "mad" && ty == Some(Ty::F32) && !mods.iter().any(|s| matches!(*s, "rn" | "rz" | "rm" | "rp")) {
                    m |= 0; // mad.f32 without rounding = fma.rn on sm_20+
                }
                Ok((Op::Alu { f, m, d, a, b, c }, class))
            }
        }
    }

    fn mma(&mut self, mods: &[&str], ops: &[Raw]) -> R<(Op, Class)> {
        let shape = mods.iter().find(|m| m.starts_with('m')).copied().unwrap_or("");
        let k = match shape {
            "m16n8k16" => 16,
            "m16n8k8" => 8,
            _ => return Err(format!("mma shape {shape} is not supported")),
        };
        let tys: Vec<Ty> = mods.iter().filter_map(|s| Ty::parse(s)).collect();
        if tys.len() != 4 || tys[0] != Ty::F32 || tys[3] != Ty::F32 || tys[1] != tys[2] || !matches!(tys[1], Ty::BF16 | Ty::F16) {
            return Err("only mma .f32.{bf16,f16}.{bf16,f16}.f32 is supported".into());
        }
        if !mods.contains(&"row") || !mods.contains(&"col") {
            return Err("mma needs .row.col".into());
        }
        let vecs: Vec<&Vec<Raw>> = ops.iter().filter_map(|r| if let Raw::Vec(v) = r { Some(v) } else { None }).collect();
        if vecs.len() != 4 {
            return Err("mma operands".into());
        }
        let na = if k == 16 { 4 } else { 2 };
        let nb = if k == 16 { 2 } else { 1 };
        if vecs[0].len() != 4 || vecs[1].len() != na || vecs[2].len() != nb || vecs[3].len() != 4 {
            return Err("mma fragment sizes".into());
        }
        let mut d = [0; 4];
        let mut a = [Src::I(0); 4];
        let mut b = [Src::I(0); 2];
        let mut c = [Src::I(0); 4];
        for i in 0..4 {
            d[i] = self.dst(&vecs[0][i])?;
            c[i] = self.src(&vecs[3][i], Some(Ty::F32))?;
        }
        for i in 0..na {
            a[i] = self.src(&vecs[1][i], None)?;
        }
        for i in 0..nb {
            b[i] = self.src(&vecs[2][i], None)?;
        }
        Ok((Op::Mma { bf: tys[1] == Ty::BF16, k, d, a, b, c }, Class::Tensor))
    }
}

macro_rules! lop3_table {
    ($($n:literal)*) => {
        fn lop3_dispatch(lut: u8) -> AluFn {
            match lut {
                $($n => |_, a, b, c| lop3_eval::<$n>(a, b, c),)*
            }
        }
    };
}
#[inline(always)]
fn lop3_eval<const L: u8>(a: u64, b: u64, c: u64) -> u64 {
    let (a, b, c) = (a as u32, b as u32, c as u32);
    let mut d = 0u32;
    for i in 0..8u32 {
        if L & (1 << i) != 0 {
            let ta = if i & 4 != 0 { a } else { !a };
            let tb = if i & 2 != 0 { b } else { !b };
            let tc = if i & 1 != 0 { c } else { !c };
            d |= ta & tb & tc;
        }
    }
    d as u64
}
lop3_table!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95 96 97 98 99 100 101 102 103 104 105 106 107 108 109 110 111 112 113 114 115 116 117 118 119 120 121 122 123 124 125 126 127 128 129 130 131 132 133 134 135 136 137 138 139 140 141 142 143 144 145 146 147 148 149 150 151 152 153 154 155 156 157 158 159 160 161 162 163 164 165 166 167 168 169 170 171 172 173 174 175 176 177 178 179 180 181 182 183 184 185 186 187 188 189 190 191 192 193 194 195 196 197 198 199 200 201 202 203 204 205 206 207 208 209 210 211 212 213 214 215 216 217 218 219 220 221 222 223 224 225 226 227 228 229 230 231 232 233 234 235 236 237 238 239 240 241 242 243 244 245 246 247 248 249 250 251 252 253 254 255);

fn pack_hint(_pos: Src, _len: Src, _b: &mut Src) -> R<Src> {
    Err("bfi with register position/length is not supported".into())
}
fn bfi32_reg(_: u8, _: u64, _: u64, _: u64) -> u64 {
    unreachable!()
}
fn bfi64_reg(_: u8, _: u64, _: u64, _: u64) -> u64 {
    unreachable!()
}
