"""Dataset conversion: uploaded sensor data -> streamable multiresolution IDX or Zarr.

- :mod:`~jobbridge.convert.registry` maps a sensor type to its reader (``@converter("TIFF")``);
- readers (:mod:`~jobbridge.convert.tiff`, :mod:`~jobbridge.convert.netcdf`,
  :mod:`~jobbridge.convert.hdf5`) hand out slabs of a :class:`~jobbridge.convert.volume.VolumeReader`;
- writers (:mod:`~jobbridge.convert.idx_writer`, :mod:`~jobbridge.convert.zarr_writer`) take them;
- :mod:`~jobbridge.convert.verify` reads the output back and compares it with the input;
- :mod:`~jobbridge.convert.pipeline` runs one conversion with staging and publishing.

Heavy libraries (tifffile, h5py, netCDF4, zarr, OpenVisus) are imported when a conversion runs, not
when this package is imported, so the CLI and the API start fast.
"""
