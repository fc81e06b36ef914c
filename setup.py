"""The C extension of the project; everything else (metadata, dependencies, packages) is in ``pyproject.toml``.

``data_pipeline._jpeg_roi`` decodes only the crop box of a JPEG with libjpeg-turbo. It is optional: without
libjpeg-turbo's headers (Debian/Ubuntu: ``apt-get install libjpeg62-turbo-dev``) the install goes on without it,
says so once, and ``data_pipeline.transforms`` decodes whole images instead.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Builds the extension when it compiles; otherwise one clear warning instead of a failed install."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # compiler missing, header missing, link error: the Python side has a fallback
            self.warn(
                f"{ext.name} not built ({type(e).__name__}, see the output above): JPEG crops will use full-image "
                "decodes. It needs libjpeg-turbo's headers (Debian/Ubuntu: apt-get install libjpeg62-turbo-dev)."
            )


setup(
    ext_modules=[
        Extension(
            "data_pipeline._jpeg_roi",
            sources=["data_pipeline/_jpeg_roi.c"],
            libraries=["jpeg"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
