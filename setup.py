"""Packaging for torch_trt_module. TensorRT is an extra: the package imports and
runs (on ONNX Runtime) without it."""

from setuptools import find_packages, setup

TEST = ["pytest>=7",
        "pytest-xdist>=3",  # the README's test command runs the suite in two processes (-n 2)
        "torchvision", "transformers>=4.40", "filelock>=3.12", "tritonclient[grpc]",
        "redis",  # the remote engine cache's client; its tests start a real redis-server
        # the real TensorRT 11.4 runtime classes: the test double is derived from them
        "tensorrt-lean-cu13"]

setup(
    name="torch_trt_module",
    version="0.1.0",
    description="Compile PyTorch modules into TensorRT / TensorRT-RTX engines that drop into torch code",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["torch_trt_module", "torch_trt_module.*"]),
    package_data={"torch_trt_module": ["py.typed"]},
    # Never pin torch exactly: a local +cpu wheel wins an exact pin and breaks torchvision.
    install_requires=["torch>=2.6", "onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18", "numpy",
                      "filelock>=3.12", "tqdm"],
    extras_require={
        "rtx": ["tensorrt-rtx-cu13"],
        "tensorrt": ["tensorrt>=10"],
        "test": TEST,
        "bench": ["matplotlib", "torchvision", "transformers>=4.40", "timm"],
        "triton": ["tritonclient[grpc]"],
    },
    entry_points={"console_scripts": ["torch-trt-module=torch_trt_module.cli:main"],
                  # torch.compile(model, backend="torch_trt_module") finds the backend here, unimported
                  "torch_dynamo_backends": ["torch_trt_module = torch_trt_module._dynamo:backend"]},
)
