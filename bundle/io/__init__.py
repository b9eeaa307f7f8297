from .datalist import PAIRINGS, check_label_supervision, load_pairs, load_subjects
from .readers import LoadImage, LoadImaged, is_file
from .writers import EXTENSIONS, OUTPUTS, CommitOutputsd, SaveNiftid, output_files, pair_folder, staging_folder, writable_folder, write_nifti
from .itk_export import (
    SaveITKTransformd,
    ddf_to_itk_field,
    ddf_to_itk_transform,
    export_ddf_file,
    itk_field_to_ddf,
    read_ddf_nifti,
    read_itk_displacement_field,
    write_itk_displacement_field,
    write_itk_transform,
)

OUTPUT_WRITERS = (SaveNiftid, SaveITKTransformd, CommitOutputsd)  # what an app that writes results itself leaves out
