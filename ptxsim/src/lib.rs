//! ptxsim: parses and executes PTX emitted by NVRTC (see ../DESIGN.md section 6).
