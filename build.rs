//! Generates the gRPC service and messages from proto/gateway.proto with tonic and prost, using
//! the protoc that protoc-bin-vendored ships (nothing to install), and writes the file
//! descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/gateway.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // The tests and the benchmark use the generated client.
        .build_client(true)
        .build_server(true)
        // Payloads as `Bytes`: passed to NATS and back without a copy.
        .bytes(".")
        // tonic's prost codec with smaller per-call buffers (src/frontend/grpc/codec.rs).
        .codec_path("crate::frontend::grpc::codec::SmallBuffers")
        .file_descriptor_set_path(out.join("gateway_descriptor.bin"))
        .compile_with_config(config, &[proto], &["proto"])?;
    Ok(())
}
