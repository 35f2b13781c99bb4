"""The Ray glue, the only room that imports Ray: the session, Ray Data, the Train worker loop,
the sampler actor pool and the Tune driver. Each calls the one-process library below it."""
