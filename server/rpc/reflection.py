"""gRPC server reflection that describes every service the server registers, KServe's included.

grpcio-reflection answers from one descriptor pool. hotlora.v1, health and reflection itself live in
protobuf's default pool; KServe's messages live in a private pool built from the vendored descriptor set
(kserve_conversion: tritonclient owns the `inference.*` names of the default pool). Answering from the
default pool, reflection listed KServe's service but described it as NOT_FOUND, so grpcurl could not call
it. This pool holds the files of both, so a reflection client (grpcurl, `hotlora describe`) can describe
and call each service it lists."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2


def serving_pool(
    files: Iterable[FileDescriptor], private_files: Iterable[descriptor_pb2.FileDescriptorProto]
) -> descriptor_pool.DescriptorPool:
    """A pool holding `files` (descriptors of the default pool) with the files they import, then
    `private_files` (serialized descriptors, dependencies first) where their name is not in it yet."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:  # a file's imports go in first
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for file in files:
        add(file)
    for proto in private_files:
        if proto.name not in added:  # a well-known type both import (google/protobuf/...)
            pool.Add(proto)
            added.add(proto.name)
    return pool


def enable(
    server,
    service_names: list[str],
    files: Iterable[FileDescriptor],
    private_files: Iterable[descriptor_pb2.FileDescriptorProto],
) -> None:
    """Serve reflection on `server` for `service_names` (and reflection itself) from one pool of `files`
    and `private_files`."""
    pool = serving_pool([*files, reflection_pb2.DESCRIPTOR], private_files)
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME], server, pool=pool)
