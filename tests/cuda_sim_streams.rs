//! Streams and events of the `Gpu` trait on `Sim`: work issued on two streams joined by an
//! event gives the CPU's result, events time work, and unknown streams/events are errors that
//! name them. (On `Sim` every launch runs to completion when issued, one valid schedule of any
//! stream program; a GPU runs the same calls through cuStreamWaitEvent / cuEventRecord.)

mod common;

use common::Rng;
use ipo::backend::cpu::CpuBackend;
use ipo::backend::cuda::{time_ms, Gpu};
use ipo::backend::Backend;

#[test]
fn two_streams_joined_by_an_event_match_the_cpu() {
    let Some(be) = common::sim() else { return };
    let cpu = CpuBackend::<f32>::new();
    let g = be.gpu();
    let (s1, s2) = (g.stream_create().unwrap(), g.stream_create().unwrap());
    assert!(s1 != 0 && s2 != 0 && s1 != s2);
    let (m, n, k) = (9, 7, 13);
    let mut r = Rng(1);
    let (a, b, y) = (r.vec(m * k, 1.0), r.vec(k * n, 1.0), r.vec(m * n, 1.0));

    // s1: c = a @ b; s2 waits for it, then c += y.
    g.set_stream(s1).unwrap();
    let mut c = be.upload(&vec![f32::NAN; m * n]);
    be.matmul(&be.upload(&a), false, &be.upload(&b), false, &mut c, m, n, k, false);
    let e = g.event_record(s1).unwrap();
    g.stream_wait_event(s2, e).unwrap();
    g.set_stream(s2).unwrap();
    be.add_assign(&mut c, &be.upload(&y));
    g.synchronize().unwrap();
    g.set_stream(0).unwrap();

    let mut want = cpu.zeros(m * n);
    cpu.matmul(&cpu.upload(&a), false, &cpu.upload(&b), false, &mut want, m, n, k, false);
    cpu.add_assign(&mut want, &cpu.upload(&y));
    let got = be.download(&c);
    let err = got.iter().zip(&want).fold(0f32, |e, (x, w)| e.max((x - w).abs()));
    assert!(err <= 1e-5, "max err {err}");

    // Timing with events around real work.
    let ms = time_ms(g, 0, || be.add_assign(&mut c, &be.upload(&y))).unwrap();
    assert!(ms.is_finite() && ms >= 0.0, "{ms}");

    // Errors name the bad handle.
    let e = g.set_stream(99).unwrap_err().to_string();
    assert!(e.contains("stream 99"), "{e}");
    let ev = g.event_record(0).unwrap();
    g.event_destroy(ev);
    let e = g.event_synchronize(ev).unwrap_err().to_string();
    assert!(e.contains(&format!("event {ev}")), "{e}");
}
