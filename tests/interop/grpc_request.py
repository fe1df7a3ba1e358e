"""Calls the gateway's Request rpc from Python's grpcio, knowing the service only through
server reflection (v1alpha, the version grpcio-reflection speaks): no proto file, no generated
code. Used by tests/grpc.rs to prove that a client that is not ours interoperates.

Usage: python3 grpc_request.py HOST:PORT   (a demo.echo service must be listening)
"""

import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main(address: str) -> None:
    channel = grpc.insecure_channel(address)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("ipcgateway.v1.Gateway").methods_by_name["Request"]
    request_class = message_factory.GetMessageClass(method.input_type)
    reply_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        "/ipcgateway.v1.Gateway/Request",
        request_serializer=request_class.SerializeToString,
        response_deserializer=reply_class.FromString,
    )

    reply, state = call.with_call(
        request_class(subject="demo.echo", payload=b"hello from python"),
        metadata=[("x-client", "grpcio")],
        timeout=5,
    )
    assert reply.payload == b"hello from python", reply
    metadata = dict(state.initial_metadata())
    assert metadata.get("x-client") == "grpcio", metadata
    print("reply:", reply.payload.decode())

    try:
        call(request_class(subject="nobody.home", payload=b"x"), timeout=5)
        raise SystemExit("expected an error")
    except grpc.RpcError as error:
        code = dict(error.trailing_metadata()).get("ipc-gateway-error")
        print("error:", error.code().name, code)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert code == "NO_RESPONDERS", code


if __name__ == "__main__":
    main(sys.argv[1])
