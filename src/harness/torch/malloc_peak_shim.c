#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>

static void *(*r_malloc)(size_t);
static void *(*r_calloc)(size_t, size_t);
static void *(*r_realloc)(void *, size_t);
static void (*r_free)(void *);
static int (*r_posix_memalign)(void **, size_t, size_t);
static void *(*r_aligned_alloc)(size_t, size_t);
static void *(*r_memalign)(size_t, size_t);
static void *(*r_valloc)(size_t);

static long live_bytes = 0, peak_bytes = 0;
static int initializing = 0;
static char bump[1 << 16];
static size_t bump_off = 0;

#define IN_BUMP(p) ((char *)(p) >= bump && (char *)(p) < bump + sizeof(bump))

static void *bump_alloc(size_t n) {
    size_t off = (bump_off + 15) & ~(size_t)15;
    if (off + n > sizeof(bump)) return NULL;
    bump_off = off + n;
    return bump + off;
}

static void init(void) {
    if (r_malloc || initializing) return;
    initializing = 1;
    r_malloc = dlsym(RTLD_NEXT, "malloc");
    r_calloc = dlsym(RTLD_NEXT, "calloc");
    r_realloc = dlsym(RTLD_NEXT, "realloc");
    r_free = dlsym(RTLD_NEXT, "free");
    r_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
    r_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
    r_memalign = dlsym(RTLD_NEXT, "memalign");
    r_valloc = dlsym(RTLD_NEXT, "valloc");
    initializing = 0;
}

static inline void add(void *p) {
    if (!p) return;
    long n = (long)malloc_usable_size(p);
    long v = __atomic_add_fetch(&live_bytes, n, __ATOMIC_RELAXED);
    long pk = __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED);
    while (v > pk && !__atomic_compare_exchange_n(&peak_bytes, &pk, v, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
}
static inline void sub(void *p) {
    if (!p) return;
    long n = (long)malloc_usable_size(p);
    __atomic_sub_fetch(&live_bytes, n, __ATOMIC_RELAXED);
}

void *malloc(size_t n) {
    if (!r_malloc) { if (initializing) return bump_alloc(n); init(); }
    void *p = r_malloc(n); add(p); return p;
}
void *calloc(size_t a, size_t b) {
    if (!r_calloc) {
        if (initializing) { void *p = bump_alloc(a * b); if (p) memset(p, 0, a * b); return p; }
        init();
    }
    void *p = r_calloc(a, b); add(p); return p;
}
void free(void *p) {
    if (!p || IN_BUMP(p)) return;
    if (!r_free) init();
    sub(p); r_free(p);
}
void *realloc(void *p, size_t n) {
    if (!r_realloc) init();
    if (IN_BUMP(p)) {
        void *q = malloc(n);
        if (q) memcpy(q, p, n);  /* bump block: size unknown, copy n (bump is large enough) */
        return q;
    }
    if (p) sub(p);
    void *q = r_realloc(p, n);
    if (q) add(q); else if (p && n) add(p);
    return q;
}
int posix_memalign(void **out, size_t al, size_t n) {
    if (!r_posix_memalign) init();
    int rc = r_posix_memalign(out, al, n);
    if (rc == 0) add(*out);
    return rc;
}
void *aligned_alloc(size_t al, size_t n) {
    if (!r_aligned_alloc) init();
    void *p = r_aligned_alloc(al, n); add(p); return p;
}
void *memalign(size_t al, size_t n) {
    if (!r_memalign) init();
    void *p = r_memalign(al, n); add(p); return p;
}
void *valloc(size_t n) {
    if (!r_valloc) init();
    void *p = r_valloc(n); add(p); return p;
}

long shim_live(void) { return __atomic_load_n(&live_bytes, __ATOMIC_RELAXED); }
long shim_peak(void) { return __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED); }
void shim_reset_peak(void) { __atomic_store_n(&peak_bytes, __atomic_load_n(&live_bytes, __ATOMIC_RELAXED), __ATOMIC_RELAXED); }
