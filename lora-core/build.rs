//! With the `cuda` feature, compiles our CUDA kernels (`kernels/*.cu`) to PTX, as candle's own
//! kernels are (nvcc at build time, `CUDA_COMPUTE_CAP` or the local GPU picks the architecture);
//! `src/engine/kernels/cuda/mod.rs` includes the result. Without it, nothing.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let ptx = cudaforge::KernelBuilder::new()
            .source_dir("kernels")
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .expect("compiling kernels/*.cu with nvcc (the `cuda` feature needs the CUDA toolkit)");
        ptx.write(out.join("ptx.rs"))
            .expect("writing the PTX bindings to OUT_DIR");
    }
}
