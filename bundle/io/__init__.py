from .datalist import PAIRINGS, load_pairs
from .writers import SaveNiftid, write_nifti
