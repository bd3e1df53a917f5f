//! Hand-written PTX (no NVRTC needed): parse errors carry the line, misaligned accesses are
//! caught, divergent branches reconverge before warp-synchronous code, counters add up.
use ptxsim::{Device, LaunchOptions, Module, ParamValue as P};

const DIVERGE: &str = r#"
.version 8.0
.target sm_80
.address_size 64
.visible .entry k(.param .u64 out, .param .u32 off)
{
    .reg .pred %p<3>;
    .reg .b32 %r<10>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [out];
    ld.param.u32 %r9, [off];
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 3;
    setp.eq.s32 %p1, %r2, 0;
    @%p1 bra $L_a;
    setp.eq.s32 %p2, %r2, 1;
    @%p2 bra $L_b;
    activemask.b32 %r3;
    bra.uni $L_join;
$L_a:
    activemask.b32 %r3;
    bra.uni $L_join;
$L_b:
    activemask.b32 %r3;
$L_join:
    activemask.b32 %r4;
    mul.wide.u32 %rd2, %r1, 8;
    add.s64 %rd3, %rd1, %rd2;
    add.s64 %rd3, %rd3, %r9;
    st.global.v2.u32 [%rd3], {%r3, %r4};
    ret;
}
"#;

#[test]
fn divergent_branches_reconverge() {
    let m = Module::parse(DIVERGE).unwrap();
    let mut dev = Device::new();
    let out = dev.alloc(32 * 8);
    let st = dev.launch(&m, "k", (1, 1, 1), (32, 1, 1), 0, &[P::Ptr(out), P::U32(0)], &LaunchOptions::default()).unwrap();
    let o: Vec<u32> = dev.read_vec(out, 64).unwrap();
    for l in 0..32 {
        let want_branch = match l % 4 {
            0 => 0x1111_1111,
            1 => 0x2222_2222,
            _ => 0xcccc_cccc,
        };
        assert_eq!(o[2 * l], want_branch, "lane {l} inside branch");
        assert_eq!(o[2 * l + 1], 0xffff_ffff, "lane {l} after join");
    }
    assert_eq!(st.global_bytes_stored(), 32 * 8);
    assert_eq!(st.bytes_loaded[3], 32 * 12, "param bytes, counted per lane");
    assert!(st.lane_instructions > 32 * 10 && st.warp_instructions >= 16);
}

#[test]
fn misaligned_vector_store_is_reported() {
    let m = Module::parse(DIVERGE).unwrap();
    let mut dev = Device::new();
    let out = dev.alloc(32 * 8 + 8);
    let e = dev.launch(&m, "k", (1, 1, 1), (32, 1, 1), 0, &[P::Ptr(out), P::U32(4)], &LaunchOptions::default()).unwrap_err().to_string();
    assert!(e.contains("misaligned 8-byte vector store") && e.contains("kernel k, PTX line 30") && e.contains("tid [0, 0, 0]"), "{e}");
}

#[test]
fn parse_errors_name_the_line() {
    let bad = DIVERGE.replace("activemask.b32 %r4;", "frobnicate.b32 %r4;");
    let e = Module::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("line 26") && e.contains("frobnicate"), "{e}");
}

#[test]
fn wrong_parameter_size_is_rejected() {
    let m = Module::parse(DIVERGE).unwrap();
    let mut dev = Device::new();
    let out = dev.alloc(8);
    let e = dev.launch(&m, "k", (1, 1, 1), (32, 1, 1), 0, &[P::Ptr(out), P::U64(0)], &LaunchOptions::default()).unwrap_err().to_string();
    assert!(e.contains("parameter 1") && e.contains("is 4 bytes, 8 given"), "{e}");
}

/// A guarded `exit` / `ret` whose guard is false in every lane falls through to the next
/// instruction (it once skipped it as well).
#[test]
fn guarded_exit_and_ret_with_false_guards_fall_through() {
    for op in ["exit", "ret"] {
        let src = format!(
            r#"
.version 8.0
.target sm_80
.address_size 64
.visible .entry k(.param .u64 out)
{{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [out];
    mov.u32 %r1, %tid.x;
    setp.gt.u32 %p1, %r1, 1000;
    mov.u32 %r2, 3;
    @%p1 {op};
    mov.u32 %r2, 7;
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r2;
    ret;
}}
"#
        );
        let m = Module::parse(&src).unwrap();
        let mut dev = Device::new();
        let out = dev.alloc(32 * 4);
        dev.launch(&m, "k", (1, 1, 1), (32, 1, 1), 0, &[P::Ptr(out)], &LaunchOptions::default()).unwrap();
        let o: Vec<u32> = dev.read_vec(out, 32).unwrap();
        assert!(o.iter().all(|&x| x == 7), "@p {op} with p false everywhere skipped the next instruction: {o:?}");
    }
}

/// Inputs found by tests/fuzz.rs (issue 16): each is a parse error naming its line, not a panic
/// (operands missing) or an 11 GB symbol table (a register count of 2^32 - 1).
#[test]
fn hostile_declarations_and_missing_operands_are_parse_errors() {
    for (bad, want) in [
        (".reg .b32 %r<4294967295>;", "exceeds 65536 registers"),
        ("activemask.b32;", "expected 1 operands"),
        ("atom.global.add.u32;", "expected 3 operands"),
    ] {
        let src = DIVERGE.replace(".reg .b32 %r<10>;", &format!(".reg .b32 %r<10>;\n    {bad}"));
        let e = Module::parse(&src).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("line"), "{bad}: {e}");
    }
}
