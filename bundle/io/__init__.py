from .datalist import PAIRINGS, load_pairs, load_subjects
from .writers import SaveNiftid, write_nifti
