// The statistics of `plan --validate`: how well the model's predictions order
// and match what `compare` measured.
#include <algorithm>
#include <utility>
#include <vector>

#include "ringattn/plan.h"

namespace ringattn {

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

RankAgreement rank_agreement(const std::vector<std::pair<double, double>>& pm, double noise) {
  RankAgreement r;
  if (pm.empty()) return r;  // a run whose methods all failed: nothing to rank
  size_t pbest = 0, mbest = 0;
  for (size_t i = 0; i < pm.size(); ++i) {
    if (pm[i].first > pm[pbest].first) pbest = i;
    if (pm[i].second > pm[mbest].second) mbest = i;
    for (size_t j = i + 1; j < pm.size(); ++j) {
      const double hi = std::max(pm[i].second, pm[j].second), lo = std::min(pm[i].second, pm[j].second);
      if (hi <= lo * (1 + noise)) continue;
      ++r.pairs;
      r.agree += (pm[i].first > pm[j].first) == (pm[i].second > pm[j].second);
    }
  }
  // the measured best counts as picked when the predicted best is within the noise of it
  r.best = pm[pbest].second * (1 + noise) >= pm[mbest].second;
  return r;
}

}  // namespace ringattn
