from setuptools import find_packages, setup


with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="trl_diffusion",
    version="0.1.0.dev0",
    description="TRL-style trainers that align text-to-image diffusion models with pairwise human preferences.",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["trl_diffusion", "trl_diffusion.*"]),
    package_data={"trl_diffusion": ["templates/*.md", "accelerate_configs/*.yaml"]},
    entry_points={"console_scripts": ["trl-diffusion=trl_diffusion.scripts.cli:main"]},
    install_requires=[
        "torch>=2.4",
        "trl>=1.16,<2",
        "transformers>=5.23,<6",
        "diffusers>=0.42,<0.43",
        "accelerate>=1.15,<2",
        "peft>=0.21,<0.22",
        "datasets>=5.2,<6",
        "safetensors>=0.4",
        "pillow>=10",
        "huggingface_hub",
    ],
    extras_require={
        "quantization": ["bitsandbytes>=0.50"],
        "video": ["av>=12"],  # PyAV: decodes (and encodes) the videos of video preference datasets
        "deepspeed": ["deepspeed"],
        "test": [
            "pytest>=8",
            "hypothesis>=6",  # property-based fuzzing of the data path (tests/test_data_robustness.py)
            "bitsandbytes>=0.50",  # its CPU kernels let the 8-bit optimizer and QLoRA tests run without a GPU
            "av>=12",  # the video tests encode and decode mp4/webm clips
            "tensorboard",
            "nbclient",
            "nbformat",
            "ipykernel",
            "mkdocs>=1.6",
            "mkdocstrings[python]",
        ],
        "docs": ["mkdocs>=1.6", "mkdocstrings[python]"],
        "dev": [
            "pytest>=8",
            "hypothesis>=6",
            "bitsandbytes>=0.50",
            "av>=12",
            "tensorboard",
            "ruff>=0.6",
            "matplotlib",
            "nbclient",
            "nbformat",
            "ipykernel",
            "mkdocs>=1.6",
            "mkdocstrings[python]",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
