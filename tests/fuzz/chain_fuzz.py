def make(slot, index): raise NotImplementedError
