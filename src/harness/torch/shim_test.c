/* Exact high-water test of malloc_peak_shim.c, compiled together with it (the shim's malloc
 * family then interposes libc's inside this program): every counted byte is
 * malloc_usable_size of a live block, the peak is the largest live total since the last reset.
 * Run by the unit tests in src/harness/torch/mod.rs; prints "ok" or the failed check. */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>

long shim_live(void);
long shim_peak(void);
void shim_reset_peak(void);

#define CHECK(c) do { if (!(c)) { printf("FAILED line %d: %s\n", __LINE__, #c); return 1; } } while (0)

int main(void) {
    long base = shim_live();
    shim_reset_peak();
    CHECK(shim_peak() == base);

    char *a = malloc(1000);
    long ua = (long)malloc_usable_size(a);
    CHECK(shim_live() == base + ua);

    void *b = NULL;
    CHECK(posix_memalign(&b, 64, 5000) == 0);
    long ub = (long)malloc_usable_size(b);
    CHECK(shim_live() == base + ua + ub);
    long high = base + ua + ub;
    CHECK(shim_peak() == high);

    free(b);
    CHECK(shim_live() == base + ua);
    CHECK(shim_peak() == high); /* the peak stays */

    a = realloc(a, 100000);
    long ua2 = (long)malloc_usable_size(a);
    CHECK(shim_live() == base + ua2);
    CHECK(shim_peak() == (base + ua2 > high ? base + ua2 : high));

    char *c = calloc(10, 300);
    long uc = (long)malloc_usable_size(c);
    void *d = aligned_alloc(256, 4096);
    long ud = (long)malloc_usable_size(d);
    CHECK(shim_live() == base + ua2 + uc + ud);

    shim_reset_peak();
    CHECK(shim_peak() == base + ua2 + uc + ud);
    free(a);
    free(c);
    free(d);
    CHECK(shim_live() == base);
    CHECK(shim_peak() == base + ua2 + uc + ud);
    printf("ok\n");
    return 0;
}
